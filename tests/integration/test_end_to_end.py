"""The demo collaboration end to end, in-process through Dagster, against a real PostgreSQL.

A copy of the demo policy named ``e2e`` runs with contribution limits wide
enough that nothing is capped, so the pre-noise aggregates can be compared
exactly with the same question answered on the plain files with pandas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.policy import query_sha256
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, ingest_run_config, materialize

from .conftest import COLLAB
from .conftest import expected_campaign_reach as _expected

pytestmark = pytest.mark.slow


def test_every_asset_materializes_and_is_recorded_in_dagster(e2e: dict[str, Any]) -> None:
    instance = dg.DagsterInstance.get()
    for key in collaboration_keys(e2e["defs"], COLLAB, releases=True):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        assert event is not None, key


def test_the_cross_reference_holds_exactly_the_shared_people(e2e: dict[str, Any]) -> None:
    with psycopg.connect(e2e["url"]) as conn:
        count, distinct = conn.execute(
            f"select count(*), count(distinct match_id) from {naming.matching_schema(COLLAB)}.cross_reference"
        ).fetchone()
    assert count == distinct == e2e["files"].shared_people
    assert e2e["outcome"].metadata[f"{COLLAB}/matching/cross_reference"]["matched"] == e2e["files"].shared_people


def test_matching_again_with_unchanged_identities_does_no_psi_work_and_keeps_the_match_ids(e2e: dict[str, Any]) -> None:
    table = f"{naming.matching_schema(COLLAB)}.cross_reference"
    with psycopg.connect(e2e["url"]) as conn:
        before = set(conn.execute(f"select match_id, retailer_token, ad_network_token from {table}").fetchall())
    outcome = materialize(e2e["defs"], [naming.cross_reference_key(COLLAB)], instance=dg.DagsterInstance.get())
    assert outcome.success
    meta = outcome.metadata[f"{COLLAB}/matching/cross_reference"]
    assert meta["recomputed"] is False and meta["matched"] == e2e["files"].shared_people
    with psycopg.connect(e2e["url"]) as conn:
        assert set(conn.execute(f"select match_id, retailer_token, ad_network_token from {table}").fetchall()) == before
    assert e2e["outcome"].metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is True


def test_pre_noise_aggregates_equal_the_plain_computation(e2e: dict[str, Any]) -> None:
    expected = _expected(e2e["files"])
    with psycopg.connect(e2e["url"]) as conn:
        rows = conn.execute(
            f"select campaign_id, store_region, buyers, spend__sum from {naming.analysis_schema(COLLAB)}.query_campaign_reach"
        ).fetchall()
    got = pd.DataFrame(rows, columns=["campaign_id", "store_region", "buyers", "spend"])
    merged = expected.merge(got, on=["campaign_id", "store_region"], suffixes=("_want", "_got"), how="outer").fillna(0)
    assert len(merged) == len(expected) > 0
    assert (merged["buyers_want"] == merged["buyers_got"]).all()
    assert ((merged["spend_want"] - merged["spend_got"].astype(float)).abs() < 1e-6).all()


def test_staging_tokens_are_the_party_keyed_hmac_and_no_raw_identifier_leaves_raw(e2e: dict[str, Any]) -> None:
    raw = pd.read_csv(e2e["files"].purchases)["customer_email"]
    key = bytes.fromhex(os.environ[secret_env_name("HMAC", COLLAB, "retailer")])
    email = raw.iloc[0].strip().lower()
    token = hmac.new(key, email.encode(), hashlib.sha256).hexdigest()
    identifiers = set(raw.str.strip()) | set(raw.str.strip().str.lower())
    identifiers |= set(pd.read_csv(e2e["files"].impressions)["user_email"].str.strip().str.lower())
    schemas = [naming.staging_schema(COLLAB, p) for p in ("retailer", "ad_network")]
    schemas += [naming.matching_schema(COLLAB), naming.analysis_schema(COLLAB), naming.results_schema(COLLAB)]
    with psycopg.connect(e2e["url"]) as conn:
        found = conn.execute(
            f'select count(*) from {naming.staging_schema(COLLAB, "retailer")}.purchases where customer_email_token = %s', (token,)
        ).fetchone()[0]
        assert found >= 1
        other = conn.execute(
            f'select count(*) from {naming.staging_schema(COLLAB, "ad_network")}.impressions where user_email_token = %s', (token,)
        ).fetchone()[0]
        assert other == 0, "tokens of the same person must differ between parties"
        tables = conn.execute(
            "select table_schema, table_name from information_schema.tables where table_schema = any(%s)", (schemas,)
        ).fetchall()
        assert len(tables) >= 6
        for schema, table in tables:
            for row in conn.execute(f'select * from "{schema}"."{table}"').fetchall():
                for value in row:
                    assert not (isinstance(value, str) and ("@" in value or value in identifiers)), (schema, table)


def test_the_release_is_noised_complete_and_charged_once(e2e: dict[str, Any]) -> None:
    meta = e2e["outcome"].metadata[f"{COLLAB}/results/campaign_reach"]
    assert meta["cached"] is False
    assert 0.95 <= meta["epsilon_charged"] <= 1.0
    assert meta["epsilon_remaining"] == pytest.approx(10.0 - meta["epsilon_charged"])
    with psycopg.connect(e2e["url"]) as conn:
        rows = conn.execute(
            f"select campaign_id, store_region, metric, value, ci_low, ci_high from {naming.results_schema(COLLAB)}.campaign_reach where release_id = %s",
            (meta["release_id"],),
        ).fetchall()
        ledger = conn.execute(f"select count(*), sum(epsilon) from {naming.results_schema(COLLAB)}.budget_ledger where query_name <> 'overlap'").fetchone()
    assert len(rows) == 6 * 4 * 2, "every cell of the public domain, empty ones too, for both metrics"
    assert all(low < value < high for *_, value, low, high in rows)
    expected = _expected(e2e["files"]).set_index(["campaign_id", "store_region"])["buyers"]
    noisy = {(c, r): v for c, r, m, v, *_ in rows if m == "buyers"}
    assert any(noisy[k] != expected.get(k, 0) for k in noisy), "released values carry noise"
    assert ledger == (1, pytest.approx(meta["epsilon_charged"]))


def test_asking_the_same_question_again_returns_the_stored_answer_for_free(e2e: dict[str, Any]) -> None:
    defs = e2e["defs"]
    first = e2e["outcome"].metadata[f"{COLLAB}/results/campaign_reach"]
    again = materialize(
        defs,
        [naming.analysis_key(COLLAB, "campaign_reach"), naming.release_key(COLLAB, "campaign_reach")],
        instance=dg.DagsterInstance.get(),
        run_config=analysis_run_config(COLLAB, {}),
    )
    assert again.success, again.failure
    meta = again.metadata[f"{COLLAB}/results/campaign_reach"]
    assert meta["cached"] is True and meta["release_id"] == first["release_id"] and meta["epsilon_charged"] == 0.0
    with psycopg.connect(e2e["url"]) as conn:
        assert conn.execute(f"select count(*) from {naming.results_schema(COLLAB)}.budget_ledger where query_name <> 'overlap'").fetchone()[0] == 1


def test_a_re_upload_of_the_same_file_loads_nothing(e2e: dict[str, Any]) -> None:
    defs = e2e["defs"]
    accepted = next((e2e["settings"].landing / "_accepted" / COLLAB / "retailer" / "purchases").glob("*__purchases.csv"))
    again = e2e["settings"].landing / COLLAB / "retailer" / "purchases" / "again.csv"
    shutil.copyfile(accepted, again)
    outcome = materialize(
        defs, [naming.raw_key(COLLAB, "purchases")], instance=dg.DagsterInstance.get(),
        run_config=ingest_run_config(COLLAB, "purchases", str(again)),
    )
    assert outcome.success
    meta = outcome.metadata[f"{COLLAB}/raw/raw_purchases"]
    assert meta["unchanged"] is True and meta["version"] == 1


def test_a_rerun_with_nothing_changed_recomputes_no_stage(e2e: dict[str, Any]) -> None:
    """Same uploads, keys, policy and SQL: no dbt build, no PSI, no new release."""
    outcome = materialize(e2e["defs"], collaboration_keys(e2e["defs"], COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    stages = {"private", "staging", "analysis"}
    dbt_keys = [k for k in outcome.metadata if k.split("/")[1] in stages]
    assert len(dbt_keys) >= 8
    assert all(outcome.metadata[k]["recomputed"] is False for k in dbt_keys), [k for k in dbt_keys if outcome.metadata[k].get("recomputed") is not False]
    assert outcome.metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is False
    assert outcome.metadata[f"{COLLAB}/results/campaign_reach"]["cached"] is True
    # The skipped stages' dbt checks did not run; each carries over its last verdict, so blocking checks still gate.
    instance = dg.DagsterInstance.get()
    evaluated = [e.dagster_event.asset_check_evaluation_data for e in instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
                 if e.dagster_event is not None]
    carried = [ev for ev in evaluated if ev.asset_key.path[1] in stages]
    assert carried and all(ev.passed and "carried over" in (ev.description or "") for ev in carried)
    assert {ev.metadata["carried_over_from_run"].value for ev in carried} - {""}, "each names the run whose verdict it carries"
    assert sum(outcome.metadata[k].get("checks_carried_over", 0) for k in dbt_keys) == len(carried)


def test_a_new_upload_rebuilds_the_stages_that_read_it(e2e: dict[str, Any]) -> None:
    accepted = next((e2e["settings"].landing / "_accepted" / COLLAB / "ad_network" / "impressions").glob("*__impressions.csv"))
    more = e2e["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions_more.csv"
    more.write_text(accepted.read_text() + "new.viewer@example.com,spring_sale,2026-03-01 10:00:00\n")
    outcome = materialize(e2e["defs"], collaboration_keys(e2e["defs"], COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    assert outcome.metadata[f"{COLLAB}/staging/secure_impressions"].get("recomputed") is not False
    assert outcome.metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is True
    assert outcome.metadata[f"{COLLAB}/analysis/pre_noise_campaign_reach"].get("recomputed") is not False
    # Put the original upload back for the tests that follow (a new version with the first content).
    restore = e2e["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions_restore.csv"
    shutil.copyfile(accepted, restore)
    again = materialize(e2e["defs"], collaboration_keys(e2e["defs"], COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert again.success, again.failure


def test_one_group_per_person_counts_each_shared_buyer_once(e2e: dict[str, Any]) -> None:
    """With max_groups_per_unit 1, the cells' buyers add up to the number of people with any row."""
    root = e2e["root"]
    spec = root / COLLAB / "queries" / "campaign_reach.yaml"
    spec.write_text(spec.read_text().replace("max_groups_per_unit: 24", "max_groups_per_unit: 1"))
    collab = root / COLLAB / "collaboration.yaml"
    old = collab.read_text().split("sha256: ")[1].split("\n")[0].strip('"')
    new = query_sha256((root / COLLAB / "queries" / "campaign_reach.sql").read_text(), spec.read_text())
    collab.write_text(collab.read_text().replace(old, new))
    defs = build_definitions(e2e["settings"])
    outcome = materialize(defs, [naming.analysis_key(COLLAB, "campaign_reach")], instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    expected = _expected(e2e["files"])
    with psycopg.connect(e2e["url"]) as conn:
        total, cells = conn.execute(f"select sum(buyers), max(buyers) from {naming.analysis_schema(COLLAB)}.query_campaign_reach").fetchone()
    people = len(set(pd.read_csv(e2e["files"].purchases)["customer_email"].str.strip().str.lower()) & set(pd.read_csv(e2e["files"].impressions)["user_email"].str.strip().str.lower()))
    assert total == people < expected["buyers"].sum()


def test_a_padded_cross_reference_changes_no_result(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from .conftest import land, make_collaboration

    collab = "padded"
    folder = make_collaboration(tmp_path, collab, groups=24)
    policy = folder / "collaboration.yaml"
    policy.write_text(policy.read_text().replace("padding: false", "padding: true"))
    settings = dataclasses.replace(runtime.settings, policies=tmp_path)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(tmp_path / "generated", rows=800, overlap=0.4, seed=13)
    land(files, settings.landing, collab)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, collab, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(collab, {}))
    assert outcome.success, outcome.failure
    meta = outcome.metadata[f"{collab}/matching/cross_reference"]
    assert meta["matched"] == files.shared_people
    assert meta["cross_reference_rows"] == files.retailer_customers + files.ad_network_users - files.shared_people
    expected = _expected(files).set_index(["campaign_id", "store_region"])
    with psycopg.connect(runtime.warehouse.url()) as conn:
        got = conn.execute(f"select campaign_id, store_region, buyers from {naming.analysis_schema(collab)}.query_campaign_reach").fetchall()
        matched_rows = conn.execute(f"select count(distinct match_id) from {naming.analysis_schema(collab)}.matched_purchases").fetchone()[0]
    assert {(c, r): int(b) for c, r, b in got} == expected["buyers"].to_dict()
    assert matched_rows == files.shared_people, "fake rows never join to real data"
