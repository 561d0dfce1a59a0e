"""The Dagster UI side: schedules and sensors from the policy, owners, charts, and the UI itself in a browser."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from dcr_pipelines.definitions import build_definitions
from dcr_pipelines.lib import naming
from dcr_pipelines.lib.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_every_asset_has_owners_kinds_and_a_description(runtime) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(runtime.settings)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable and key.path[0] == "demo":
            assert node.description and node.owners and node.kinds, key
    assert graph.get(dg.AssetKey(naming.raw_key("demo", "retailer", "purchases"))).owners == ["team:retailer"]
    assert graph.get(dg.AssetKey(naming.staging_key("demo", "ad_network", "impressions"))).owners == ["team:ad_network"]


def test_schedules_come_from_the_policy(runtime) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(runtime.settings)
    schedule = defs.resolve_schedule_def("demo__nightly_refresh")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_the_policy_sensor_reports_changes_and_mistakes_and_reapplies_grants(runtime, policies_copy: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    settings = dataclasses.replace(runtime.settings, policies=policies_copy)
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("demo__policy_changes")
    instance = dg.DagsterInstance.get()
    with dg.build_sensor_context(instance=instance, definitions=defs) as context:
        first = list(sensor(context))
        cursor = context.cursor
    assert [type(r) for r in first] == [dg.RunRequest] and first[0].asset_selection is None  # the sensor's target: grants
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        assert "unchanged" in list(sensor(context))[0].skip_message
    policy = policies_copy / "demo" / "collaboration.yaml"
    policy.write_text(policy.read_text().replace("epsilon: 10.0", "epsilon: 8.0"))
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        assert "changed on disk" in list(sensor(context))[0].skip_message
    policy.write_text(policy.read_text().replace("epsilon: 8.0", "epsilon: plenty"))
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as context:
        message = list(sensor(context))[0].skip_message
    assert "1 mistake(s)" in message and "collaboration.yaml:" in message and "budgets[0].epsilon" in message


def test_a_release_chart_is_a_png(tmp_path: Path) -> None:
    from dcr_pipelines.lib.chart import release_chart

    rows = [
        {"campaign_id": c, "store_region": r, "metric": m, "value": v, "ci_low": v - 5, "ci_high": v + 5}
        for c in ("a", "b") for r in ("north", "south") for m, v in (("buyers", 10.0), ("spend", 100.0))
    ]
    path = release_chart(rows, ["campaign_id", "store_region"], ["buyers", "spend"], "t", tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium); the browser test needs it")
def test_the_ui_lists_the_demo_assets_in_a_headless_browser(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    ui = subprocess.Popen(
        [str(Path(sys.executable).with_name("dg")), "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd=PROJECT_ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the UI did not start within 120 s")
        url = f"http://127.0.0.1:{port}/asset-groups/demo/list"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1500,1000",
                 "--virtual-time-budget=20000"]
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = runtime.settings.home / "screenshots" / "ui-demo-assets.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    for name in ("cross_reference", "retailer__purchases", "campaign_reach"):
        assert name in dom, f"{name} not listed in the UI"
    assert shot.is_file() and shot.stat().st_size > 20_000
