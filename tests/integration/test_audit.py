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
from dcr_pipelines.lib import audit, demo_data, naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import ad_hoc_run_config, analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.store import audit_chain

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
    for sql_text, accepted in (("select i.campaign_id, count(*) as n from impressions as i group by 1", True), ("select * from customers", False)):
        ran = materialize(defs, [naming.ad_hoc_key(COLLAB)], instance=instance, run_config=ad_hoc_run_config(COLLAB, "ad_network", sql_text))
        assert ran.success is accepted
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
        # every staged upload (all feed the matching) and the cross-reference: what the release read
        assert set(meta["input_versions"]) == {"retailer.purchases", "retailer.customers", "ad_network.impressions", "cross_reference"}
        assert meta["epsilon_charged"] == pytest.approx(1.0, abs=0.05) and meta["receivers"] == "ad_network, retailer"
        assert meta["policy_sha256"] == audited["loaded"].policy_sha256
    assert first["params"] == {"since": "2026-01-01"} and second["params"] == {"since": "2026-02-01"}
    assert [r["user"] for r in releases] == ["alice@retail.example", "bob@ads.example"]
    ingests = [e for e in entries if e["asset"].startswith(f"{COLLAB}/raw/") and e["kind"] == "materialization"]
    rows = {"purchases": 500, "impressions": 500, "customers": 250}  # customers: one row per retailer customer
    assert all(e["metadata"]["row_count"] == rows[e["asset"].split("/")[-1].removeprefix(naming.RAW_LABEL)] and len(e["metadata"]["checksum_sha256"]) == 64 for e in ingests)
    matched = [e for e in entries if e["asset"] == f"{COLLAB}/matching/cross_reference"]
    assert matched and matched[0]["metadata"]["matched"] == 125
    refused = [e for e in entries if e["kind"] == "refused" and e["asset"].endswith("campaign_reach")]
    assert refused and "cannot cover query campaign_reach" in refused[-1]["metadata"]["message"] and refused[-1]["user"] == "bob@ads.example"
    ad_hoc = [e for e in entries if e["asset"].endswith("ad_hoc")]
    assert [e["kind"] for e in ad_hoc] == ["materialization", "refused"]
    assert ad_hoc[1]["metadata"]["runner"] == "ad_network" and ad_hoc[1]["metadata"]["query"] == "select * from customers"


def test_a_party_exports_only_entries_that_touch_its_data(audited: dict[str, Any]) -> None:
    mine = trail.entries(audited["instance"], audited["loaded"], party="retailer")
    assets = {e["asset"] for e in mine}
    assert f"{COLLAB}/raw/raw_purchases" in assets and f"{COLLAB}/results/campaign_reach" in assets
    assert not any("ad_network__" in a for a in assets)
    # Ad-hoc runs over the retailer's data, refused ones too, with runner and SQL; not the ad network's runs over its own table.
    ad_hoc = [e for e in mine if e["asset"].endswith("ad_hoc")]
    assert [(e["kind"], e["metadata"]["runner"], e["metadata"]["query"]) for e in ad_hoc] == [("refused", "ad_network", "select * from customers")]
    # Nothing the policy does not release to it: the other party's row counts, the size of the exchange.
    for e in mine:
        assert not any(k == "input_rows_ad_network" or k == "bytes_exchanged" for k in e["metadata"]), e
    ours = trail.entries(audited["instance"], audited["loaded"], party="ad_network")
    assert any(e["asset"].endswith("ad_hoc") and e["kind"] == "materialization" for e in ours)


def test_a_party_private_entry_keeps_the_owner_it_had_when_a_dataset_name_changes_hands(audited: dict[str, Any]) -> None:
    """Each upload, normalised, secure and identity-list entry records its party. If the ad network's dataset name
    later belongs to the retailer (dropped from one party's policy, declared by the other), the retailer's export
    still holds none of the ad network's entries under that name, and the ad network's still holds them."""
    loaded = audited["loaded"]
    entries = trail.entries(audited["instance"], loaded)
    private = [e for e in entries if e["asset"].split("/")[1] in ("raw", "private", "staging") and e["kind"] != "failed"]
    owners = {f"{COLLAB}/{k[1]}/{k[2]}": ds.owner for name, ds in loaded.collaboration.datasets.items()
              for k in (naming.raw_key(COLLAB, name), naming.normalised_key(COLLAB, name), naming.staging_key(COLLAB, name))}
    owners |= {"/".join(naming.identities_key(COLLAB, p)): p for p in loaded.parties()}
    assert private and {e["asset"] for e in private} >= set(owners) - {f"{COLLAB}/private/ids_{p}" for p in loaded.parties()}
    assert all(e["metadata"].get("party") == owners[e["asset"]] for e in private), [(e["asset"], e["metadata"].get("party")) for e in private]
    datasets = dict(loaded.collaboration.datasets)
    datasets["impressions"] = datasets["impressions"].model_copy(update={"owner": "retailer"})
    moved = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(update={"datasets": datasets}))
    theirs = {e["asset"] for e in private if "impressions" in e["asset"]}
    assert theirs
    assert not theirs & {e["asset"] for e in trail.entries(audited["instance"], moved, party="retailer")}
    assert theirs <= {e["asset"] for e in trail.entries(audited["instance"], moved, party="ad_network")}
    # Not only the private stages: matched and pre-noise views, releases and ad-hoc runs (the ad network's own over
    # impressions among them) record whom they concerned, so each party's export is the same under either policy.
    for party in ("retailer", "ad_network"):
        def seen(policy: Any, party: str = party) -> set[tuple[str, str, str]]:
            return {(e["asset"], e["kind"], e["time"]) for e in trail.entries(audited["instance"], policy, party=party) if e["kind"] != "failed"}
        assert seen(moved) == seen(loaded), (party, seen(moved) ^ seen(loaded))
    analysis = [e for e in entries if e["asset"].split("/")[1] in ("analysis", "results") and e["kind"] != "failed"]
    assert analysis and all("concerns" in e["metadata"] for e in analysis), [e["asset"] for e in analysis if "concerns" not in e["metadata"]]


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


# Every table the audit chain vouches for, the column a single-row edit changes, and how to insert a new row.
TABLES = {
    "releases": ("rows = jsonb_set(rows, '{0,value}', '123456')",
                 "insert into {t} (release_id, cache_key, query_name, consumer, params, input_versions, epsilon, rows) "
                 "select release_id || '-copy', cache_key || '-copy', query_name, consumer, params, input_versions, epsilon, rows from {t} where ctid = %s"),
    "campaign_reach": ("value = value + 1", "insert into {t} select * from {t} where ctid = %s"),
    "overlap": ("value = value + 1", "insert into {t} select * from {t} where ctid = %s"),
    "budget_ledger": ("epsilon = epsilon + 0.5", "insert into {t} (consumer, query_name, release_id, epsilon) select consumer, query_name, release_id, epsilon from {t} where ctid = %s"),
    "ad_hoc__ad_network": ("rows = '[]'::jsonb", "insert into {t} (run_id, query_sha256, query, columns, rows) select run_id || '-copy', query_sha256, query, columns, rows from {t} where ctid = %s"),
    "audit_chain": ("entry = entry || '{\"note\": 1}'::jsonb", "insert into {t} (kind, ref, entry, entry_sha256, prev_sha256, chain_sha256) "
                    "select kind, ref, entry, entry_sha256, prev_sha256, chain_sha256 from {t} where ctid = %s"),
}


def _table_problems(conn: psycopg.Connection, referenced: set[str], loaded: Any) -> list[str]:
    """What verify finds in the database (the event log, read once, does not change here)."""
    schema = naming.results_schema(COLLAB)
    chain = audit_chain.chain(conn, schema)
    return [str(p) for p in (*audit.verify_chain(chain), *audit.verify_tables(chain, trail.evidence(conn, loaded)),
                             *audit.verify_referenced(chain, referenced))]


def test_every_single_row_edit_delete_and_insert_in_every_chained_table_is_detected(audited: dict[str, Any]) -> None:
    assert _problems(audited) == []
    schema = naming.results_schema(COLLAB)
    referenced = trail.chain_references(audited["instance"], audited["loaded"])
    tried = 0
    with psycopg.connect(audited["url"], autocommit=True) as conn:
        for table, (edit, insert) in TABLES.items():
            t = f'"{schema}"."{table}"'
            rows = [r[0] for r in conn.execute(f"select ctid from {t}").fetchall()]
            assert rows, f"{table} is empty: the fixture must fill every chained table"
            for ctid in rows:
                for action, statement in (("edit", f"update {t} set {edit} where ctid = %s"), ("delete", f"delete from {t} where ctid = %s"),
                                          ("insert", insert.format(t=t))):
                    with conn.transaction():
                        conn.execute(statement, (ctid,))
                        found = _table_problems(conn, referenced, audited["loaded"])
                        assert found, f"{action} of a row of {table} went unnoticed"
                        tried += 1
                        raise psycopg.Rollback()  # undo the tampering
        assert _table_problems(conn, referenced, audited["loaded"]) == []
    assert tried >= 3 * 20
    assert _problems(audited) == []


def test_every_edit_deletion_or_insertion_of_the_difference_check_history_is_detected(audited: dict[str, Any]) -> None:
    """An operator who deletes or edits dcr_meta.released_people would re-open rows the difference checks withhold;
    the digest chained with each run catches it, and so does a set inserted for a run that never made it."""
    referenced = trail.chain_references(audited["instance"], audited["loaded"])
    t = "dcr_meta.released_people"
    with psycopg.connect(audited["url"], autocommit=True) as conn:
        rows = [r[0] for r in conn.execute(f"select ctid from {t} where collaboration = %s", (COLLAB,)).fetchall()]
        assert rows, "the fixture's exact ad-hoc run must have recorded its groups"
        tampering = [("edit", f"update {t} set people = substring(people from 9) where ctid = %s", (rows[0],)),
                     ("delete", f"delete from {t} where ctid = %s", (rows[-1],)),
                     ("delete all", f"delete from {t} where collaboration = %s", (COLLAB,)),
                     ("insert", f"insert into {t} (collaboration, source, source_id, row_no, size, sample, people) "
                                f"select collaboration, source, 'forged', row_no, size, sample, people from {t} where ctid = %s", (rows[0],))]
        for action, statement, args in tampering:
            with conn.transaction():
                conn.execute(statement, args)
                found = _table_problems(conn, referenced, audited["loaded"])
                assert found and all("people sets" in p for p in found), (action, found)
                raise psycopg.Rollback()
        assert _table_problems(conn, referenced, audited["loaded"]) == []


def test_a_rewritten_history_is_caught_by_a_head_a_party_saved(audited: dict[str, Any]) -> None:
    schema = naming.results_schema(COLLAB)
    with psycopg.connect(audited["url"], autocommit=True) as conn:
        rid = conn.execute(f'select release_id from "{schema}".releases where query_name = \'campaign_reach\' order by released_at limit 1').fetchone()[0]
    anchors = sorted(audited["settings"].exports.glob(f"{COLLAB}/*/campaign_reach/{rid}.anchor.json"))
    assert anchors, "every export carries the chain head"
    saved = audit.Anchor.from_json(json.loads(anchors[0].read_text()))
    with psycopg.connect(audited["url"], autocommit=True) as conn, conn.transaction():
        # The operator edits a release everywhere and recomputes the whole chain: consistent on its own ...
        conn.execute(f'update "{schema}".releases set epsilon = 0.01 where release_id = %s', (rid,))
        rows = conn.execute(f'select seq, entry from "{schema}".audit_chain order by seq').fetchall()
        previous = audit.GENESIS
        for seq, entry in rows:
            if entry.get("release_id") == rid and "results_sha256" in entry:
                entry["epsilon"] = 0.01
            digest = audit.entry_digest(entry)
            chained = audit.link(previous, digest)
            conn.execute(f'update "{schema}".audit_chain set entry = %s, entry_sha256 = %s, prev_sha256 = %s, chain_sha256 = %s where seq = %s',
                         (json.dumps(entry), digest, previous, chained, seq))
            previous = chained
        chain = audit_chain.chain(conn, schema)
        assert audit.verify_chain(chain) == [] and audit.verify_tables(chain, trail.evidence(conn, audited["loaded"])) == []
        # ... but not with the head a receiver saved from its export.
        found = [str(p) for p in audit.verify_chain(chain, [saved])]
        assert any("history was rewritten" in p for p in found), found
        raise psycopg.Rollback()
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


def test_a_refused_release_is_a_green_run_with_an_observation_not_a_materialization(audited: dict[str, Any]) -> None:
    entries = trail.entries(audited["instance"], audited["loaded"])
    refused = [e for e in entries if e["kind"] == "refused" and e["asset"].endswith("results/campaign_reach")]
    assert refused and refused[-1]["metadata"]["rule"] == "budget"
    run = audited["instance"].get_run_by_id(refused[-1]["run_id"])
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert not [e for e in entries if e["kind"] == "materialization" and e["run_id"] == run.run_id and e["asset"].endswith("results/campaign_reach")]
    # Its checks answered anyway: the budget held, the chain is intact.
    for name in ("budget_respected", "release_in_audit_chain"):
        key = dg.AssetCheckKey(dg.AssetKey(naming.release_key(COLLAB, "campaign_reach")), name)
        records = audited["instance"].event_log_storage.get_asset_check_execution_history(key, limit=20)
        mine = [r for r in records if r.run_id == run.run_id]
        assert mine and mine[0].event.dagster_event.event_specific_data.passed, name


def test_the_budget_sensor_warns_once_in_its_tick_on_the_asset_pages_and_on_the_release_run(audited: dict[str, Any]) -> None:
    from dcr_pipelines.defs.automation import _budget_sensor
    from dcr_pipelines.defs.common import BUDGET_LOW_TAG
    from dcr_pipelines.defs.resources import WarehouseResource

    loaded = audited["loaded"]
    (budget,) = loaded.collaboration.budgets
    warned = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(
        update={"budgets": [budget.model_copy(update={"warn_below": budget.epsilon * 0.99})]}))
    quiet = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(
        update={"budgets": [budget.model_copy(update={"warn_below": 0.0})]}))
    resources = {"warehouse": WarehouseResource(url=audited["url"])}
    with dg.build_sensor_context(instance=audited["instance"], resources=resources) as context:
        result = _budget_sensor(quiet).evaluate_tick(context)
    assert not result.run_requests and "more budget left" in (result.skip_message or "")
    with dg.build_sensor_context(instance=audited["instance"], resources=resources) as context:
        first = _budget_sensor(warned).evaluate_tick(context)
    assert not first.run_requests and "privacy budget low" in (first.skip_message or "") and budget.consumer in first.skip_message
    assert [e.asset_key for e in first.asset_events] == [dg.AssetKey(naming.release_key(COLLAB, "campaign_reach"))]
    query = loaded.queries["campaign_reach"]  # whom the warning concerns, recorded for the audit filter
    assert first.asset_events[0].metadata["concerns"].value == ", ".join(sorted({*query.spec.receivers, budget.consumer,
                                                                           *(loaded.collaboration.datasets[d].owner for d in query.datasets)}))
    tagged = audited["instance"].get_runs(dg.RunsFilter(tags={"dcr/collaboration": COLLAB}), limit=100)
    assert any(BUDGET_LOW_TAG in r.tags and budget.consumer in r.tags[BUDGET_LOW_TAG] for r in tagged)
    with dg.build_sensor_context(instance=audited["instance"], resources=resources, cursor=first.cursor) as context:
        again = _budget_sensor(warned).evaluate_tick(context)
    assert "privacy budget low" in (again.skip_message or "") and not again.asset_events  # nothing new spent: no repeated events


def test_zz_a_chained_run_deleted_from_the_run_storage_fails_the_verification(audited: dict[str, Any]) -> None:
    """Every run the chain names must be in Dagster's run storage (one ad-hoc run once went to a stray SQLite storage).
    (Named to run last: it deletes a run of the module's collaboration.)"""
    instance = audited["instance"]
    assert _problems(audited) == []
    with psycopg.connect(audited["url"]) as conn:
        chain = audit_chain.chain(conn, naming.results_schema(COLLAB))
    run_id = next(row for row in chain if row.kind == "ad_hoc").entry["run_id"]
    instance.delete_run(run_id)
    problems = _problems(audited)
    assert any(run_id in p and "is not in the Dagster run storage" in p for p in problems), problems
