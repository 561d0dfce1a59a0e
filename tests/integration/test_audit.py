"""The audit trail: exported from Dagster's event log, per party, and tamper-evident."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import dagster as dg
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.defs import audit as trail
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize

from .conftest import land, make_collaboration

pytestmark = pytest.mark.slow
COLLAB = "audited"


@pytest.fixture(scope="module")
def audited(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("audit_policies")
    make_collaboration(root, COLLAB, groups=3, budget=2.5)
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    land(demo_data.generate(tmp_path_factory.mktemp("audit_data"), rows=500, overlap=0.5, seed=3), settings.landing, COLLAB)
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.get()
    os.environ["DCR_USER"] = "alice@retail.example"
    assert materialize(defs, collaboration_keys(defs, COLLAB, releases=True), instance=instance, run_config=analysis_run_config(COLLAB, {})).success
    os.environ["DCR_USER"] = "bob@ads.example"
    query_keys = [naming.analysis_key(COLLAB, "campaign_reach"), naming.release_key(COLLAB, "campaign_reach")]
    second = materialize(defs, query_keys, instance=instance, run_config=analysis_run_config(COLLAB, {"campaign_reach": {"since": "2026-02-01"}}))
    assert second.success
    refused = materialize(defs, query_keys, instance=instance, run_config=analysis_run_config(COLLAB, {"campaign_reach": {"since": "2026-03-01"}}))
    assert not refused.success and "cannot cover" in (refused.failure or "")
    os.environ.pop("DCR_USER")
    loaded = load_collaboration(root / COLLAB)
    return {"loaded": loaded, "url": runtime.warehouse.url(), "dagster_url": runtime.dagster_url, "settings": settings, "instance": instance}


def test_the_export_covers_every_stage_with_what_a_reviewer_needs(audited: dict[str, Any]) -> None:
    entries = trail.entries(audited["instance"], audited["loaded"])
    stages = {e["asset"].split("/")[1] for e in entries}
    assert stages >= {"access", "raw", "private", "staging", "matching", "analysis", "results"}
    releases = [e for e in entries if e["asset"] == f"{COLLAB}/results/campaign_reach" and e["kind"] == "materialization"]
    assert len(releases) == 2
    first, second = (r["metadata"] for r in releases)
    for meta in (first, second):
        assert meta["query_sha256"] == audited["loaded"].queries["campaign_reach"].sha256
        assert {a["member"] for a in meta["approvals"]} == {"retailer", "ad_network"}
        assert set(meta["input_versions"]) == {"retailer.purchases", "retailer.customers", "ad_network.impressions"}  # every upload: all feed the matching
        assert meta["epsilon_charged"] == pytest.approx(1.0, abs=0.05) and meta["receivers"] == "ad_network, retailer"
        assert meta["policy_sha256"] == audited["loaded"].policy_sha256
    assert first["params"] == {"since": "2026-01-01"} and second["params"] == {"since": "2026-02-01"}
    assert [r["user"] for r in releases] == ["alice@retail.example", "bob@ads.example"]
    ingests = [e for e in entries if e["asset"].startswith(f"{COLLAB}/raw/") and e["kind"] == "materialization"]
    rows = {"purchases": 500, "impressions": 500, "customers": 250}  # customers: one row per retailer customer
    assert all(e["metadata"]["row_count"] == rows[e["asset"].split("__")[-1]] and len(e["metadata"]["checksum_sha256"]) == 64 for e in ingests)
    matched = [e for e in entries if e["asset"] == f"{COLLAB}/matching/cross_reference"]
    assert matched and matched[0]["metadata"]["matched"] == 125
    refused = [e for e in entries if e["kind"] == "refused or failed"]
    assert refused and "cannot cover query campaign_reach" in refused[-1]["metadata"]["message"] and refused[-1]["user"] == "bob@ads.example"


def test_a_party_exports_only_entries_that_touch_its_data(audited: dict[str, Any]) -> None:
    mine = trail.entries(audited["instance"], audited["loaded"], party="retailer")
    assets = {e["asset"] for e in mine}
    assert f"{COLLAB}/raw/retailer__purchases" in assets and f"{COLLAB}/results/campaign_reach" in assets
    assert not any("ad_network__" in a for a in assets)


def test_the_cli_exports_jsonl_and_csv(audited: dict[str, Any]) -> None:
    env = {**os.environ, "DCR_POLICIES": str(audited["settings"].policies)}
    dcr = [sys.executable, "-m", "dcr_pipelines.cli", "audit", COLLAB]
    jsonl = subprocess.run([*dcr, "--format", "jsonl"], env=env, capture_output=True, text=True)
    assert jsonl.returncode == 0, jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(rows) == len(trail.entries(audited["instance"], audited["loaded"]))
    csv_out = subprocess.run([*dcr, "--format", "csv", "--since", "2020-01-01"], env=env, capture_output=True, text=True)
    assert csv_out.stdout.splitlines()[0] == "time,kind,asset,run_id,user,metadata" and len(csv_out.stdout.splitlines()) == len(rows) + 1
    ok = subprocess.run([*dcr, "--verify"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "intact" in ok.stdout


def _problems(audited: dict[str, Any]) -> list[str]:
    with psycopg.connect(audited["url"]) as conn:
        return [str(p) for p in trail.verify(audited["instance"], conn, audited["loaded"])]


def test_verify_detects_an_edited_or_deleted_release_entry(audited: dict[str, Any]) -> None:
    assert _problems(audited) == []
    table = f"{naming.results_schema(COLLAB)}.releases"
    with psycopg.connect(audited["url"], autocommit=True) as conn:
        first, second = [r[0] for r in conn.execute(f"select release_id from {table} where query_name <> 'overlap' order by seq").fetchall()]
        conn.execute(f"update {table} set epsilon = 0.1 where release_id = %s", (first,))
        assert any(first in p and "stored entry was edited" in p for p in _problems(audited))
        conn.execute(f"update {table} set epsilon = 1.0 where release_id = %s", (first,))
        assert _problems(audited) == []
        conn.execute(f"create temp table saved as select * from {table} where release_id = %s", (first,))
        conn.execute(f"delete from {table} where release_id = %s", (first,))
        problems = _problems(audited)
        assert any(second in p and "link to the previous entry is broken" in p for p in problems)
        assert any(first in p and "missing from the releases table" in p for p in problems)
        conn.execute(f"insert into {table} select * from saved")
    assert _problems(audited) == []


def test_verify_detects_an_edited_or_deleted_dagster_event(audited: dict[str, Any]) -> None:
    with psycopg.connect(audited["dagster_url"], autocommit=True) as conn:
        row = conn.execute(
            "select id, event from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION' and event like %s order by id limit 1",
            (f'%{COLLAB}%results%audit_chain_sha256%',),
        ).fetchone()
        assert row is not None
        event_id, original = row
        conn.execute("update event_logs set event = replace(event, '\"rows_sha256\": \"', '\"rows_sha256\": \"0') where id = %s", (event_id,))
        try:
            assert any("Dagster event was edited" in p for p in _problems(audited))
        finally:
            conn.execute("update event_logs set event = %s where id = %s", (original, event_id))
        assert _problems(audited) == []
        saved = conn.execute("select * from event_logs where id = %s", (event_id,)).fetchone()
        columns = [d.name for d in conn.execute("select * from event_logs limit 0").description]
        conn.execute("delete from event_logs where id = %s", (event_id,))
        try:
            assert any("missing from the Dagster event log" in p for p in _problems(audited))
        finally:
            conn.execute(f"insert into event_logs ({', '.join(columns)}) values ({', '.join(['%s'] * len(columns))})", saved)
    assert _problems(audited) == []
