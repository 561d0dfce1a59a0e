"""Every analysis-rule setting through real runs: ad-hoc SQL via Dagster on PostgreSQL.

The ``ad_hoc`` collaboration is the demo with its rules varied: impressions
(the runner's own) allow OR joins and CASE with a threshold of 5 people;
customers require a join with the runner's table and 25 people per row;
``segments`` (a copy of the customer file) is under a list rule; purchases
under a custom rule (approved queries only). Results are compared with the
same aggregate on the plain files joined on the normalised email.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.defs import freshness
from dcr_pipelines.defs.audit import entries
from dcr_pipelines.lib import ad_hoc, demo_data, naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import ad_hoc_run_config, analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services import ad_hoc as ad_hoc_service

from ..policy_edits import exact_customers, threshold_tier_reach
from .conftest import land

COLLAB = "ad_hoc"
JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"

SEGMENTS = """
  segments:
    owner: retailer
    columns:
      customer_email: {type: text, identifier: email, nullable: false, join: true}
      loyalty_tier: {type: text, nullable: false, list: true}
      age_band: {type: text, nullable: false, list: true}
      lifetime_value: {type: numeric, nullable: false}
    shared: [loyalty_tier, age_band]
    analysis_rule: {type: list, join_operators: [and, or], min_distinct_units: 3}
"""


@pytest.fixture(scope="module")
def collab(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("ad_hoc_policies")
    folder = root / COLLAB
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "collaboration.yaml"
    text = exact_customers(path.read_text()).replace("    mode: append", "    mode: replace").replace("name: demo", f"name: {COLLAB}")
    impressions_rule = (
        "    analysis_rule:  # the ad network's own table: ad-hoc aggregates, thresholded\n"
        "      type: aggregation\n      min_distinct_units: 25\n      join_required: false\n"
        "      scalar_functions: [date_trunc, extract, lower, upper, round, coalesce]\n      join_operators: [and]\n"
    )
    assert impressions_rule in text
    text = text.replace(
        impressions_rule,
        "    analysis_rule:\n      type: aggregation\n      min_distinct_units: 5\n      join_required: false\n"
        "      scalar_functions: [date_trunc, case, upper]\n      join_operators: [and, or]\n",
    )
    text = text.replace("scalar_functions: [date_trunc, extract, lower, upper, round, coalesce]", "scalar_functions: [date_trunc, round]")
    text = text.replace("    analysis_rule: {type: dp}\n", "    analysis_rule: {type: custom}\n", 1)
    text = text.replace("\nbudgets:", SEGMENTS + "\nbudgets:", 1)
    path.write_text(text)
    threshold_tier_reach(folder)
    approve_all(folder)
    loaded = load_collaboration(folder)
    assert loaded.collaboration.datasets["purchases"].analysis_rule.type == "custom"
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=1_500, overlap=0.4, seed=21)
    land(files, settings.landing, COLLAB)
    segments = settings.landing / COLLAB / "retailer" / "segments" / "segments.csv"
    segments.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files.customers, segments)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return {"defs": defs, "files": files, "url": runtime.warehouse.url(), "loaded": loaded, "settings": settings}


def forget_history(url: str, collab: str = COLLAB) -> None:
    """Drop the difference-check history, so that a test compares one query with plain pandas (tests of the
    difference check itself keep the history)."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("select to_regclass('dcr_meta.released_people')").fetchone()[0] is not None:
            conn.execute("delete from dcr_meta.released_people where collaboration = %s", (collab,))


def _run(collab: dict[str, Any], sql_text: str, runner: str = "ad_network", fresh: bool = True) -> tuple[Any, pd.DataFrame | None]:
    if fresh:
        forget_history(collab["url"])
    outcome = materialize(collab["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(), run_config=ad_hoc_run_config(COLLAB, runner, sql_text))
    if not outcome.success:
        return outcome, None
    with psycopg.connect(collab["url"], autocommit=True) as conn:
        columns, rows = ad_hoc_service.stored_rows(conn, COLLAB, runner, outcome.run_id)
    return outcome, pd.DataFrame(rows, columns=columns)


def _plain(collab: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    files = collab["files"]
    i = pd.read_csv(files.impressions).assign(email=lambda f: f["user_email"].str.strip().str.lower())
    c = pd.read_csv(files.customers).assign(email=lambda f: f["customer_email"].str.strip().str.lower())
    return i, c


def _same(actual: pd.DataFrame, expected: pd.DataFrame, keys: list[str]) -> None:
    actual = actual.sort_values(keys).reset_index(drop=True)
    expected = expected.sort_values(keys).reset_index(drop=True)[list(actual.columns)]
    pd.testing.assert_frame_equal(actual, expected, check_dtype=False, check_exact=False, rtol=1e-9)


def test_exact_aggregates_are_per_person_and_equal_the_plain_join_minus_rows_under_the_threshold(collab) -> None:  # type: ignore[no-untyped-def]
    """Per person first: COUNT(*) counts people, SUM reads each customer row once however many impressions join it."""
    outcome, got = _run(collab, f"select c.loyalty_tier, c.age_band, count(distinct c.customer_email) as buyers, "
                                f"count(*) as rows_counted, sum(c.lifetime_value) as value, avg(c.lifetime_value) as mean {JOIN} group by 1, 2")
    assert outcome.success, outcome.failure
    i, c = _plain(collab)
    joined = i.merge(c, on="email")
    assert (joined.groupby("email").size() > 1).any(), "people with several impressions must exist, or the test proves nothing"
    once = joined.drop_duplicates("email")  # one customer row per person
    expected = once.groupby(["loyalty_tier", "age_band"], as_index=False).agg(
        buyers=("email", "nunique"), rows_counted=("email", "size"), value=("lifetime_value", "sum"), mean=("lifetime_value", "mean"))
    kept = expected[expected["buyers"] >= 25]
    assert 0 < len(kept) < len(expected), "the data must put groups on both sides of the threshold"
    _same(got, kept, ["loyalty_tier", "age_band"])


def test_the_most_restrictive_threshold_wins(collab) -> None:  # type: ignore[no-untyped-def]
    i, c = _plain(collab)
    matched = i[i["email"].isin(set(c["email"]))]
    # impressions alone: its own threshold (5)
    _, alone = _run(collab, "select campaign_id, date_trunc('month', impression_time) as month, count(distinct user_email) as people "
                            "from impressions group by 1, 2")
    per = matched.assign(month=pd.to_datetime(matched["impression_time"]).dt.to_period("M").dt.to_timestamp()).groupby(
        ["campaign_id", "month"], as_index=False).agg(people=("email", "nunique"))
    assert alone is not None
    alone["month"] = pd.to_datetime(alone["month"])
    _same(alone, per[per["people"] >= 5], ["campaign_id", "month"])
    # joined with customers: 25
    _, joined = _run(collab, f"select i.campaign_id, date_trunc('month', i.impression_time) as month, count(distinct c.customer_email) as people {JOIN} group by 1, 2")
    assert joined is not None
    assert len(joined) < len(alone) and (joined["people"] >= 25).all()


def test_list_rule_returns_distinct_values_over_the_overlap(collab) -> None:  # type: ignore[no-untyped-def]
    sql_and = "select distinct s.loyalty_tier, s.age_band from segments as s inner join impressions as i on i.user_email = s.customer_email"
    _, got = _run(collab, sql_and)
    _, got_or = _run(collab, sql_and + " or s.customer_email = i.user_email")  # OR is allowed by both datasets
    i, c = _plain(collab)
    joined = i.merge(c, on="email")
    counts = joined.groupby(["loyalty_tier", "age_band"], as_index=False).agg(n=("email", "nunique"))
    expected = counts[counts["n"] >= 3][["loyalty_tier", "age_band"]]
    assert got is not None and got_or is not None
    _same(got, expected, ["loyalty_tier", "age_band"])
    _same(got_or, expected, ["loyalty_tier", "age_band"])


@pytest.mark.parametrize(
    ("runner", "sql_text", "rule"),
    [
        ("ad_network", "select loyalty_tier, count(*) from customers group by 1", "join_required"),
        ("ad_network", "select store_region, count(*) from purchases group by 1", "custom rule"),
        ("ad_network", f"select upper(c.loyalty_tier), count(*) {JOIN} group by 1", "scalar_functions"),  # impressions allows upper, customers not
        ("ad_network", "select c.loyalty_tier, count(*) from impressions i join customers c on c.customer_email = i.user_email or i.user_email = c.customer_email group by 1", "join_operators"),
        ("ad_network", f"select c.loyalty_tier, max(c.lifetime_value) {JOIN} group by 1", "aggregate columns"),
        ("ad_network", f"select c.customer_email, count(*) {JOIN} group by 1", "join columns"),
        ("retailer", f"select c.loyalty_tier, count(*) {JOIN} group by 1", "member abilities"),
    ],
)
def test_refused_queries_name_the_rule_are_logged_and_are_not_failed_runs(collab, runner: str, sql_text: str, rule: str) -> None:  # type: ignore[no-untyped-def]
    outcome, _ = _run(collab, sql_text, runner)
    assert not outcome.success and outcome.refused
    assert outcome.failure.startswith("query refused:") and rule in outcome.failure
    logged = [e for e in entries(dg.DagsterInstance.get(), collab["loaded"]) if e["run_id"] == outcome.run_id]
    assert logged and logged[0]["kind"] == "refused" and rule in logged[0]["metadata"]["message"]
    assert logged[0]["metadata"]["runner"] == runner
    # An expected outcome: a green run of the collaboration's ad-hoc job, nothing materialized.
    run = dg.DagsterInstance.get().get_run_by_id(outcome.run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS and run.job_name == f"{COLLAB}__ad_hoc"
    assert run.tags.get("dcr/outcome") == "refused" and run.tags.get("dcr/refused_by"), run.tags  # the runs list tells it apart
    assert not outcome.metadata


def test_case_is_allowed_where_every_dataset_allows_it(collab) -> None:  # type: ignore[no-untyped-def]
    _, got = _run(collab, "select case when campaign_id like 's%' then 'early' else 'late' end as season, count(*) as n from impressions group by 1")
    i, c = _plain(collab)
    matched = i[i["email"].isin(set(c["email"]))]
    expected = matched.assign(season=matched["campaign_id"].str.startswith("s").map({True: "early", False: "late"})).groupby(
        "season", as_index=False).agg(n=("email", "nunique"))  # exact mode: COUNT(*) counts people
    assert got is not None
    _same(got, expected, ["season"])


def test_accepted_runs_are_logged_and_results_are_the_runners_only(collab) -> None:  # type: ignore[no-untyped-def]
    outcome, got = _run(collab, f"select c.loyalty_tier, count(*) as n {JOIN} group by 1")
    assert got is not None and len(got) == 3
    meta = outcome.metadata["/".join(naming.ad_hoc_key(COLLAB))]
    assert meta["runner"] == "ad_network" and meta["min_distinct_units"] == 25 and meta["rows"] == 3
    table = f'"{naming.results_schema(COLLAB)}"."{ad_hoc_service.results_table("ad_network")}"'
    with psycopg.connect(collab["url"], autocommit=True) as conn:
        conn.execute(f"set role dcr_{COLLAB}_ad_network_result_reader")
        assert conn.execute(f"select count(*) from {table} where run_id = %s", (outcome.run_id,)).fetchone()[0] == 1
        conn.execute("reset role")
        conn.execute(f"set role dcr_{COLLAB}_retailer_result_reader")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select * from {table}")


def test_the_analysis_role_cannot_write_even_through_the_checked_query(collab) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(collab["loaded"], "ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1")
    statement = f'create table "{naming.analysis_schema(COLLAB)}".stolen (x int)'
    tampered = dataclasses.replace(checked, phase1=statement, phase1_without_people=statement)
    with psycopg.connect(collab["url"], autocommit=True) as conn, pytest.raises(ad_hoc.QueryRefused):
        ad_hoc_service.execute(conn, collab["loaded"], tampered, "tampered", "x", freshness.staged(dg.DagsterInstance.get(), conn, collab["loaded"]))
    # The run's own role, as it is granted: it may read the matched views it names, and write nothing anywhere.
    with psycopg.connect(collab["url"]) as conn:
        role = ad_hoc_service._temporary_role(conn, collab["loaded"], checked)
        conn.execute(psycopg.sql.SQL("set role {}").format(role))
        assert conn.execute(f'select count(*) from "{naming.analysis_schema(COLLAB)}".matched_customers').fetchone()[0] > 0
        for write in (statement, f'insert into "{naming.results_schema(COLLAB)}".audit_chain (kind) values (\'x\')',
                      f'create table "{naming.results_schema(COLLAB)}".stolen (x int)', "create table public.stolen (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(write)
        conn.rollback()
    with psycopg.connect(collab["url"]) as conn:
        assert conn.execute(f"select to_regclass('\"{naming.analysis_schema(COLLAB)}\".stolen')").fetchone()[0] is None


def test_threshold_rule_release_equals_plain_aggregate_minus_small_groups(collab) -> None:  # type: ignore[no-untyped-def]
    outcome = materialize(collab["defs"], [naming.release_key(COLLAB, "tier_reach")], instance=dg.DagsterInstance.get())
    assert outcome.success, outcome.failure
    meta = outcome.metadata["/".join(naming.release_key(COLLAB, "tier_reach"))]
    assert "epsilon_of_release" not in meta and meta["rule"].startswith("threshold")
    with psycopg.connect(collab["url"], autocommit=True) as conn:
        rows = conn.execute(f'select campaign_id, loyalty_tier, metric, value from "{naming.results_schema(COLLAB)}".tier_reach where release_id = %s',
                            (meta["release_id"],)).fetchall()
    got = pd.DataFrame(rows, columns=["campaign_id", "loyalty_tier", "metric", "value"]).pivot(
        index=["campaign_id", "loyalty_tier"], columns="metric", values="value").reset_index()
    i, c = _plain(collab)
    exposed = i[i["impression_time"] >= "2026-01-01"][["email", "campaign_id"]].drop_duplicates().merge(c, on="email")
    exposed["clamped"] = exposed["lifetime_value"].clip(0, 5000)
    expected = exposed.groupby(["campaign_id", "loyalty_tier"], as_index=False).agg(buyers=("email", "nunique"), lifetime_value=("clamped", "mean"))
    kept = expected[expected["buyers"] >= 25]
    assert 0 < len(kept) < len(expected)
    got.columns.name = None
    _same(got[["campaign_id", "loyalty_tier", "buyers", "lifetime_value"]], kept, ["campaign_id", "loyalty_tier"])
    # Its asset checks ran with it: the threshold re-read from the pre-noise table, the release in the audit chain.
    instance = dg.DagsterInstance.get()
    for name in ("threshold_respected", "release_in_audit_chain"):
        key = dg.AssetCheckKey(dg.AssetKey(naming.release_key(COLLAB, "tier_reach")), name)
        (record,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
        assert record.run_id == outcome.run_id and record.event.dagster_event.event_specific_data.passed, name
    # The released table itself is on the asset page, counts as integers.
    preview = [record.data for record in meta["released_values"].records]
    assert preview and set(preview[0]) == {"campaign_id", "loyalty_tier", "buyers", "lifetime_value"}
    assert sorted(int(r["buyers"]) for r in preview) == sorted(int(b) for b in kept["buyers"]) and all(r["buyers"].isdigit() for r in preview)
    assert meta["about_these_values"].startswith("Threshold rule: exact values")
    # The threshold check is a second look: a group under the threshold in the released rows fails it.
    from dcr_pipelines.services import release_checks
    from dcr_pipelines.store import analysis as store_analysis
    from dcr_pipelines.store import ledger

    small = expected[expected["buyers"] < 25].iloc[0]
    with psycopg.connect(collab["url"]) as conn:
        request = store_analysis.built_for(conn, COLLAB, "tier_reach")
        forged = ledger.StoredRelease("forged", False, 0.0, [{"campaign_id": small["campaign_id"], "loyalty_tier": small["loyalty_tier"],
                                                              "metric": "buyers", "value": 1.0}], None)  # type: ignore[arg-type]
        verdict = release_checks.check_release(conn, collab["loaded"], collab["loaded"].queries["tier_reach"], forged, request)[0]
    assert verdict.name == "threshold_respected" and not verdict.passed and "under 25 people" in verdict.detail


def test_an_ad_hoc_run_without_a_query_is_refused_and_chains_nothing(collab) -> None:  # type: ignore[no-untyped-def]
    from dcr_pipelines.store import audit_chain

    with psycopg.connect(collab["url"]) as conn:
        before = len(audit_chain.chain(conn, naming.results_schema(COLLAB)))
    outcome = materialize(collab["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(), run_config=ad_hoc_run_config(COLLAB, "", ""))
    assert outcome.run_success and outcome.refused and "needs a request" in (outcome.failure or "")
    with psycopg.connect(collab["url"]) as conn:
        assert len(audit_chain.chain(conn, naming.results_schema(COLLAB))) == before


@pytest.mark.parametrize("query", ["tier_reach", "campaign_reach"])
def test_a_release_launched_without_a_request_is_refused_and_charges_nothing(collab, query: str) -> None:  # type: ignore[no-untyped-def]
    """A click on "Materialize" in the UI (or `dg launch --assets`) runs the asset with no config: a release spends
    budget only on a request that says who asks, so this one is a green, refused run that charges and releases nothing.
    The same launch with a request is answered, and its audit entry names who asked."""
    from dcr_pipelines.runner import job_for
    from dcr_pipelines.store import audit_chain

    key = naming.release_key(COLLAB, query)
    schema = naming.results_schema(COLLAB)
    with psycopg.connect(collab["url"]) as conn:
        chained = len(audit_chain.chain(conn, schema))
    job = job_for(collab["defs"], [key])
    bare = job.execute_in_process(instance=dg.DagsterInstance.get(), asset_selection=[dg.AssetKey(key)], raise_on_error=False)
    assert bare.success and not bare.get_asset_materialization_events()
    refusal = [e.asset_observation_data.asset_observation.metadata for e in bare.get_asset_observation_events()]
    assert refusal and refusal[0]["rule"].value == "request" and "spends privacy budget" in refusal[0]["message"].value
    with psycopg.connect(collab["url"]) as conn:
        assert len(audit_chain.chain(conn, schema)) == chained  # no release, no charge
    asked = job.execute_in_process(instance=dg.DagsterInstance.get(), asset_selection=[dg.AssetKey(key)], raise_on_error=False,
                                   run_config={"ops": {"__".join(key): {"config": {"requested_by": "carol@ads.example", "params": {"since": "2026-02-07"}}}}})
    assert asked.success and asked.get_asset_materialization_events()
    meta = asked.get_asset_materialization_events()[0].materialization.metadata
    assert meta["requested_by"].value == "carol@ads.example" and meta["audit_entry"].value["requested_by"] == "carol@ads.example"


def test_a_query_the_database_cannot_build_fails_naming_the_cause_and_the_policy_file(collab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A type mistake the column check cannot see (text compared with a number): the release names the database's own
    message and the query file, not a log that no longer exists; nothing is released or charged."""
    from dcr_pipelines.definitions import build_definitions

    folder = collab["loaded"].folder
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    sql_path = folder / "queries" / "tier_reach.sql"
    try:
        sql_path.write_text(sql_path.read_text().replace("where exposed.impression_time", "where exposed.campaign_id > 5 and exposed.impression_time"))
        approve_all(folder)
        settings = dataclasses.replace(collab["settings"], policies=folder.parent)
        defs = build_definitions(settings)
        outcome = materialize(defs, [naming.release_key(COLLAB, "tier_reach")], instance=dg.DagsterInstance.get(),
                              run_config=analysis_run_config(COLLAB, {"tier_reach": {"since": "2026-02-02"}}))
        assert not outcome.success
        message = outcome.failure or ""
        assert "could not be built for this request; nothing was released or charged" in message
        assert "the database says: " in message and "operator does not exist: text > integer" in message and str(sql_path) in message
        assert "run log" not in message
    finally:
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
