"""`dcr report COLLAB --member MEMBER`: one member's own static page, with only what that member may see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dcr_pipelines.lib import naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.presentation import release_table
from dcr_pipelines.store import audit_chain, results

from .conftest import COLLAB

pytestmark = pytest.mark.slow
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
SNOOPING = "select * from purchases where purchase_value > 999"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(e2e: dict[str, Any], member: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DCR_POLICIES": str(e2e["root"])}
    return subprocess.run([*DCR, "report", COLLAB, "--member", member, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def reports(e2e: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import dagster as dg

    from dcr_pipelines.runner import ad_hoc_run_config, materialize

    refused = materialize(e2e["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(),
                          run_config=ad_hoc_run_config(COLLAB, "ad_network", SNOOPING))
    assert refused.refused
    out = {}
    for member in ("ad_network", "retailer"):
        folder = tmp_path_factory.mktemp(f"report_{member}")
        done = _report(e2e, member, folder)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        out[member] = folder
    return out


def test_the_receiver_sees_its_release_with_intervals_a_chart_and_the_chain_head(e2e: dict[str, Any], reports: dict[str, Path]) -> None:
    loaded = load_collaboration(e2e["root"] / COLLAB)
    page = (reports["ad_network"] / "index.html").read_text()
    with psycopg.connect(e2e["url"]) as conn:
        latest = results.latest_release(conn, COLLAB, "campaign_reach")
        head = audit_chain.head(conn, naming.results_schema(COLLAB), COLLAB)
    assert latest is not None and head is not None
    assert latest.release_id in page
    shown = release_table(loaded.queries["campaign_reach"].spec, latest.rows)
    assert shown.rows and all(f"<td class=\"num\">{cell}</td>" in page for row in shown.rows for cell in row[2:])  # value [95% interval]
    assert (reports["ad_network"] / "charts" / "campaign_reach.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    anchor = json.loads((reports["ad_network"] / "chain-head.anchor.json").read_text())
    assert anchor == {"collaboration": COLLAB, "seq": head.seq, "chain_sha256": head.chain_sha256} and head.chain_sha256 in page
    assert "has spent epsilon" in page  # ad_network is the consumer: its budget


def test_a_member_sees_only_its_own_uploads_and_no_release_it_does_not_receive(e2e: dict[str, Any], reports: dict[str, Path]) -> None:
    mine = (reports["retailer"] / "index.html").read_text()
    theirs = (reports["ad_network"] / "index.html").read_text()
    assert "purchases.csv" in mine and "impressions.csv" not in mine
    assert "impressions.csv" in theirs and "purchases.csv" not in theirs
    with psycopg.connect(e2e["url"]) as conn:
        latest = results.latest_release(conn, COLLAB, "campaign_reach")
    assert latest is not None
    assert latest.release_id not in mine and "Nothing released to retailer yet" in mine  # receivers: [ad_network] only
    assert not (reports["retailer"] / "charts").exists()
    # It does see who spent budget on its data (the release reads the retailer's purchases).
    assert "Who spends budget on your data" in mine and "campaign_reach" in mine.split("Who spends budget on your data")[1]


def test_an_unknown_member_or_a_folder_of_other_files_is_one_error_line(e2e: dict[str, Any], tmp_path: Path) -> None:
    unknown = _report(e2e, "nobody", tmp_path / "r")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: ") and unknown.stderr.count("\n") == 1 and "members:" in unknown.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = _report(e2e, "retailer", tmp_path / "busy")
    assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs it where it may); the browser check needs it")
def test_the_report_renders_in_a_browser_with_its_charts(reports: dict[str, Path]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto((reports["ad_network"] / "index.html").as_uri())
        for heading in ("Releases you receive", "Privacy budget", "Every query over your data", "Your uploads and their validation",
                        "Audit chain head: keep it"):
            assert page.get_by_role("heading", name=heading).is_visible(), heading
        widths = page.eval_on_selector_all("img.chart", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert widths and all(w > 300 for w in widths), widths
        assert page.locator("table.release tr").count() > 2
        page.screenshot(path=str(reports["ad_network"] / "screenshot.png"), full_page=True)
        browser.close()


def test_the_owner_sees_every_query_over_its_data_with_runner_and_sql_refused_ones_too(reports: dict[str, Path]) -> None:
    mine = (reports["retailer"] / "index.html").read_text()
    queries = mine.split("Every query over your data", 1)[1].split("Your uploads", 1)[0]
    assert "select * from purchases where purchase_value &gt; 999" in queries  # the SQL, escaped
    row = queries.split("select * from purchases", 1)[0].rsplit("<tr>", 1)[1]
    assert "ad-hoc SQL" in row and "ad_network" in row
    assert "refused" in queries.split("select * from purchases", 1)[1].split("</tr>", 1)[0]
    assert "release of campaign_reach" in queries  # releases over its data, though it does not receive them
