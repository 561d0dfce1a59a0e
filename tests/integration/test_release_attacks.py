"""Attacks through the real release path: PostgreSQL, the generated dbt models, opendp and the ledger."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services.release import release_query
from dcr_pipelines.store import analysis as store_analysis
from dcr_pipelines.store import ledger

from .conftest import COLLAB, land, make_collaboration

pytestmark = pytest.mark.slow


def _built_from(conn: psycopg.Connection, collab: str, query: str) -> tuple[dict[str, str], dict[str, Any]]:
    row = conn.execute(f"select params, input_versions from {naming.analysis_schema(collab)}.built_from where query_name = %s", (query,)).fetchone()
    return dict(row[0]), dict(row[1])


def test_asking_hundreds_of_times_never_narrows_the_answer(e2e: dict[str, Any]) -> None:
    loaded = load_collaboration(e2e["root"] / COLLAB)
    query = loaded.queries["campaign_reach"]
    with psycopg.connect(e2e["url"], autocommit=True) as conn:
        params, versions = _built_from(conn, COLLAB, "campaign_reach")
        first = release_query(conn, loaded, query, params, versions)  # stored already, or charged once now
        ledger_before = conn.execute(f"select count(*) from {naming.results_schema(COLLAB)}.budget_ledger").fetchone()[0]
        answers = {release_query(conn, loaded, query, params, versions).release_id for _ in range(299)} | {first.release_id}
        ledger_after = conn.execute(f"select count(*) from {naming.results_schema(COLLAB)}.budget_ledger").fetchone()[0]
        assert len(answers) == 1 and ledger_after == ledger_before
        # Varying the question to get fresh noise runs into the budget instead.
        fresh = 0
        with pytest.raises(ledger.BudgetExhausted, match="cannot cover query campaign_reach"):
            for day in range(2, 40):
                release_query(conn, loaded, query, {"since": f"2026-01-{day:02d}" if day < 32 else f"2026-02-{day - 31:02d}"}, versions)
                fresh += 1
        spent = conn.execute(f"select sum(epsilon) from {naming.results_schema(COLLAB)}.budget_ledger").fetchone()[0]
    assert fresh <= 9 and spent <= 10.0


HEAVY = "Heavy.Hitter@Example.com"


def day(offset: int) -> str:
    import datetime as dt

    return (dt.date(2026, 1, 1) + dt.timedelta(days=offset)).isoformat()


def _append_heavy_person(files: demo_data.DemoFiles, rows: int = 10_000) -> None:
    regions = ["north", "south", "east", "west"]
    campaigns = ["spring_sale", "summer_launch", "back_to_school", "black_friday", "holiday_gifts", "new_year"]
    # Distinct, plausible rows (the upload contract rejects duplicates and an implausible mean),
    # each region's spend far above the query's clamp.
    with files.purchases.open("a") as handle:
        handle.writelines(f"{HEAVY},{1000 + (i % 97) / 100:.2f},{day(i % 180)},{regions[i % 4]}\n" for i in range(rows))
    with files.impressions.open("a") as handle:
        handle.writelines(f"{HEAVY},{campaigns[i % 6]},2026-03-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}\n" for i in range(rows))


def _most_groups_of_anyone(files: demo_data.DemoFiles) -> int:
    import pandas as pd

    p = pd.read_csv(files.purchases).assign(email=lambda f: f["customer_email"].str.strip().str.lower())
    i = pd.read_csv(files.impressions).assign(email=lambda f: f["user_email"].str.strip().str.lower())
    groups = p[["email", "store_region"]].drop_duplicates().merge(i[["email", "campaign_id"]].drop_duplicates(), on="email")
    return int(groups.groupby("email").size().max())


def _pre_noise(url: str, collab: str) -> dict[tuple[str, str], tuple[int, float]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"select campaign_id, store_region, buyers, spend__sum from {naming.analysis_schema(collab)}.query_campaign_reach").fetchall()
    return {(c, r): (int(b), float(s)) for c, r, b, s in rows}


def test_one_person_with_ten_thousand_rows_moves_aggregates_by_at_most_the_bound(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Neighbouring datasets: without and with one matched person who has 10,000 rows on each side.

    The group limit is above what any ordinary person reaches, so only the
    heavy person is capped and every other person's contribution is the same
    in both runs (which groups a capped person keeps depends on the random
    match_ids, which a rebuilt cross-reference draws afresh).
    """
    collab = "contrib"
    make_collaboration(tmp_path, collab, groups=12)
    settings = dataclasses.replace(runtime.settings, policies=tmp_path)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(tmp_path / "generated", rows=600, overlap=0.5, seed=9)
    land(files, settings.landing, collab)
    defs = build_definitions(settings)
    keys = collaboration_keys(defs, collab, releases=True)
    instance = dg.DagsterInstance.get()
    assert materialize(defs, keys, instance=instance, run_config=analysis_run_config(collab, {})).success
    before = _pre_noise(runtime.warehouse.url(), collab)
    assert _most_groups_of_anyone(files) <= 12 < 24  # the heavy person reaches all 24 groups

    _append_heavy_person(files)
    land(files, settings.landing, collab)
    outcome = materialize(defs, keys, instance=instance, run_config=analysis_run_config(collab, {}))
    assert outcome.success, outcome.failure
    assert outcome.metadata[f"{collab}/matching/cross_reference"]["matched"] == files.shared_people + 1
    after = _pre_noise(runtime.warehouse.url(), collab)

    spec = load_collaboration(tmp_path / collab).queries["campaign_reach"].spec
    g, k = spec.contribution.max_groups_per_unit, spec.contribution.max_rows_per_group
    bound = spec.metrics["spend"].bounds[1]
    cells = set(before) | set(after)
    buyers_change = {c: after.get(c, (0, 0.0))[0] - before.get(c, (0, 0.0))[0] for c in cells}
    spend_change = {c: after.get(c, (0, 0.0))[1] - before.get(c, (0, 0.0))[1] for c in cells}
    assert sum(abs(v) for v in buyers_change.values()) == g, "the person counts in exactly g groups"
    assert all(abs(v) <= k for v in buyers_change.values())
    assert sum(abs(v) for v in spend_change.values()) <= g * k * bound + 1e-6
    assert sum(abs(v) for v in spend_change.values()) == pytest.approx(g * k * bound), "clamping, not dropping"


def test_key_selection_through_the_release_path_releases_only_keys_that_clear_the_threshold(e2e: dict[str, Any]) -> None:
    """campaign_id without a public domain: only groups whose noisy person count clears opendp's threshold appear."""
    from dcr_pipelines.lib.policy.models import Budget, Dimension
    from dcr_pipelines.lib.privacy.mechanisms import plan_key_selection

    loaded = load_collaboration(e2e["root"] / COLLAB)
    query = loaded.queries["campaign_reach"]
    dims = dict(query.spec.dimensions) | {"campaign_id": Dimension(key_selection_delta=1e-6)}
    spec = query.spec.model_copy(update={"dimensions": dims})
    selection = plan_key_selection(spec)
    assert selection is not None
    generous = loaded.collaboration.model_copy(update={"budgets": (Budget(consumer="ad_network", epsilon=1e6, delta=1e-3),)})
    loaded = dataclasses.replace(loaded, collaboration=generous)
    query = dataclasses.replace(query, spec=spec, sha256="key-selection-test")
    table = f"{naming.analysis_schema(COLLAB)}.query_campaign_reach"
    with psycopg.connect(e2e["url"], autocommit=True) as conn:
        params, versions = _built_from(conn, COLLAB, "campaign_reach")
        # Known pre-noise counts: one huge group, every other group a single person (a table in the view's place).
        conn.execute(f"alter view {table} rename to query_campaign_reach__real")
        conn.execute(f"create table {table} as select * from {table}__real")
        conn.execute(f"grant select on {table} to {store_analysis.pre_noise_reader(COLLAB)}")  # what the release reads as
        conn.execute(f"update {table} set buyers = case when campaign_id = 'new_year' and store_region = 'north' then 100000 else 1 end")
        try:
            stored = release_query(conn, loaded, query, params, versions)
        finally:
            conn.execute(f"drop table {table}")
            conn.execute(f"alter view {table}__real rename to query_campaign_reach")
    released = {(r["campaign_id"], r["store_region"]) for r in stored.rows}
    assert released == {("new_year", "north")}, "a group of one person never appears; the huge one does"
    assert {r["metric"] for r in stored.rows} == {"buyers", "spend"}
    assert stored.budget.delta_spent == pytest.approx(selection.delta)


def test_released_results_are_exported_for_each_receiver_only(e2e: dict[str, Any]) -> None:
    exports = e2e["settings"].exports / COLLAB
    release_id = e2e["outcome"].metadata[f"{COLLAB}/results/campaign_reach"]["release_id"]
    assert (exports / "ad_network" / "campaign_reach" / f"{release_id}.csv").is_file()
    assert (exports / "ad_network" / "campaign_reach" / f"{release_id}.parquet").is_file()
    assert not (exports / "retailer").exists(), "retailer does not receive campaign_reach in e2e"


def test_the_release_checks_catch_an_overspent_budget_and_a_release_missing_from_the_chain(e2e: dict[str, Any]) -> None:
    from dcr_pipelines.lib.policy.models import Budget
    from dcr_pipelines.services import release_checks
    from dcr_pipelines.store import results

    # Other tests of this module spend under a generous budget (key selection); the check is run against that one.
    loaded = load_collaboration(e2e["root"] / COLLAB)
    loaded = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(
        update={"budgets": (Budget(consumer="ad_network", epsilon=1e6, delta=1e-3),)}))
    query = loaded.queries["campaign_reach"]
    release_id = e2e["outcome"].metadata[f"{COLLAB}/results/campaign_reach"]["release_id"]
    with psycopg.connect(e2e["url"]) as conn:
        stored_now = results.latest_release(conn, COLLAB, "campaign_reach", release_id)
        assert stored_now is not None
        stored = ledger.StoredRelease(release_id, True, stored_now.epsilon, stored_now.rows, None)  # type: ignore[arg-type]
        clean = release_checks.check_release(conn, loaded, query, stored, None)
        assert [(o.name, o.passed) for o in clean] == [("budget_respected", True), ("release_in_audit_chain", True)], clean
        # An entry the ledger never allowed (over the budget's epsilon), inside a transaction rolled back after.
        conn.execute(f'insert into "{naming.results_schema(COLLAB)}".budget_ledger (consumer, query_name, release_id, epsilon) '
                     "values ('ad_network', 'campaign_reach', 'forged', 2e6)")
        budget, chain = release_checks.check_release(conn, loaded, query, stored, None)
        assert not budget.passed and "spent epsilon" in budget.detail and chain.passed
        conn.rollback()
        missing = dataclasses.replace(stored, release_id="20990101T000000-deadbeef")
        _, chain = release_checks.check_release(conn, loaded, query, missing, None)
        assert not chain.passed and "no entry in the audit chain" in chain.detail
