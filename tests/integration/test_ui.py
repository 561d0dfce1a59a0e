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

from .conftest import checkout_copy

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_every_asset_has_owners_kinds_and_a_description(runtime) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(runtime.settings)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable and key.path[0] == "demo":
            assert node.description and node.owners and node.kinds, key
    assert graph.get(dg.AssetKey(naming.raw_key("demo", "purchases"))).owners == ["team:retailer"]
    assert graph.get(dg.AssetKey(naming.staging_key("demo", "impressions"))).owners == ["team:ad_network"]


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
    assert [type(r) for r in first] == [dg.RunRequest] and first[0].asset_selection == [dg.AssetKey(naming.grants_key("demo"))]
    assert sensor.job_name == "demo__all"
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


def _dcr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("dcr")), *args], capture_output=True, text=True, timeout=600)


NO_BROWSER = ("Chromium is not installed and could not be (`make test` installs Debian's chromium with apt-get when it runs as root); "
              "the browser test needs it")


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_the_ui_shows_lineage_released_tables_automation_and_refusals_as_green_runs(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    demo = _dcr("demo", "--rows", "2000")
    assert demo.returncode == 0, demo.stderr
    refused = _dcr("query", "run", "demo", "--member", "ad_network", "select * from customers")
    assert refused.returncode == 1 and refused.stderr.startswith("error: query refused:"), refused.stderr
    instance = dg.DagsterInstance.get()
    (refused_run,) = instance.get_runs(dg.RunsFilter(job_name="demo__ad_hoc"), limit=1)
    assert refused_run.status == dg.DagsterRunStatus.SUCCESS

    port = _free_port()
    ui = subprocess.Popen(
        [str(Path(sys.executable).with_name("dg")), "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd=checkout_copy(tmp_path), env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    shots = runtime.settings.home / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{base}/server_info", timeout=2).status == 200:  # noqa: S310 (our own http://127.0.0.1 URL)
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("the UI did not start within 180 s")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(90_000)  # the first GraphQL answers take a while on a busy 2-core machine

            # Lineage: the graph of the collaboration, every node drawn (labels are shortened to fit the nodes).
            group = f"{base}/locations/dcr_pipelines/asset-groups/demo"
            page.goto(f"{group}/lineage")
            for label in ("cross_reference", "tier_reach", "matched_customers"):
                page.get_by_text(label, exact=True).first.wait_for()
            page.screenshot(path=str(shots / "ui-lineage.png"))
            # Each stage has its own, self-explaining name (no two nodes read "retailer__customers"; the graph snapshot test
            # checks every key): the staging asset's page is found by its name.
            page.goto(f"{base}/assets/demo/staging/secure_customers")
            page.get_by_text("Secure table of retailer's customers").first.wait_for()

            # A results page shows the released table itself (counts as whole numbers, each value with its 95% interval),
            # labelled by its rule, with its checks.
            page.goto(f"{base}/assets/demo/results/tier_reach")
            page.get_by_text("released_values").first.wait_for()
            page.get_by_text("Differentially private (opendp Laplace noise)").first.wait_for()
            body = page.inner_text("body")
            assert "loyalty_tier" in body and "differentially private (opendp, epsilon 1.0)" in body
            table = body.split("released_values", 1)[1].split("Differentially private", 1)[0]
            counts = [line.split("\t")[2] for line in table.splitlines() if line.count("\t") >= 3 and "buyers" not in line]
            assert counts and all(c.split(" [")[0].strip().lstrip("-").isdigit() for c in counts), table
            # ... and fits the page: its last column ends before Dagster's side panel (large values are shortened there).
            last = page.get_by_text("lifetime_value", exact=True).first.bounding_box()
            side = page.get_by_text("Definition", exact=True).first.bounding_box()
            assert last and side and last["x"] + last["width"] <= side["x"], (last, side)
            page.screenshot(path=str(shots / "ui-release.png"), full_page=True)
            page.goto(f"{base}/assets/demo/results/tier_reach?view=checks")
            page.get_by_text("budget_respected").first.wait_for()
            page.get_by_text("release_in_audit_chain").first.wait_for()

            # Automation: the collaboration's sensors, the budget watch among them.
            page.goto(f"{base}/automation")
            page.get_by_text("demo__budget_watch").first.wait_for()
            page.get_by_text("demo__landing_files").first.wait_for()
            page.screenshot(path=str(shots / "ui-automation.png"))

            # The refused query is a green run of the ad-hoc job, not a failure.
            page.goto(f"{base}/runs/{refused_run.run_id}")
            page.get_by_text("Success").first.wait_for()
            page.get_by_text("query refused").first.wait_for()  # the rule is in its event log, as a warning and an observation
            page.screenshot(path=str(shots / "ui-refused-query.png"))
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: dg dev's webserver and daemon can take longer to stop
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)
    for name in ("ui-lineage.png", "ui-release.png", "ui-automation.png"):
        assert (shots / name).stat().st_size > 20_000, name
    if os.environ.get("DCR_UPDATE_SCREENSHOTS") == "1":  # `DCR_UPDATE_SCREENSHOTS=1 make test`: the README's pictures, taken here
        from dcr_pipelines.lib.settings import PROJECT_ROOT

        for name in ("ui-lineage.png", "ui-release.png"):
            shutil.copyfile(shots / name, PROJECT_ROOT / "docs" / name)
