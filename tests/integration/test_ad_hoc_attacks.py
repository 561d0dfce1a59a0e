"""The attacks an analyst ran on ad-hoc SQL, each shown to work with its defence switched off and to fail with it on.

The ``attacks`` collaboration is the demo (same rules, thresholds of 25,
difference checks on) plus ``agency``, a member without data that may run
queries. The ad network knows its own impressions; its target is Tess, a
retailer customer who saw one ad, on 31 December 2025, a day no one else
did. Everything the analyst gets goes through the product's own code paths
(``ad_hoc.check`` and ``ad_hoc_service.execute``, which the Dagster asset calls, and
one Dagster run each for the ad-hoc asset and the threshold release).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import ad_hoc, demo_data, naming
from dcr_pipelines.lib.policy import LoadedCollaboration, PolicyError, load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.policy.models import AdHocLimits, DifferenceChecks
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import ad_hoc_run_config, analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services import ad_hoc as ad_hoc_service

from ..policy_edits import exact_customers, threshold_tier_reach
from .conftest import land
from .test_ad_hoc import forget_history

COLLAB = "attacks"
TESS = "tess.target@example.org"
TESS_TIME = "2025-12-31T10:00:00"
TESS_VALUE = 777.77
JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"
AGENCY = "\n  agency:\n    abilities: [run_queries, receive_results]\n"


def staged_now(conn: Any, loaded: Any) -> Any:
    """What the staged data were built from, as Dagster's event log records it (the gate's input)."""
    import dagster as dg

    from dcr_pipelines.defs import freshness

    return freshness.staged(dg.DagsterInstance.get(), conn, loaded)



@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("attack_policies")
    folder = root / COLLAB
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "collaboration.yaml"
    path.write_text(exact_customers(path.read_text()).replace("    mode: append", "    mode: replace").replace("name: demo", f"name: {COLLAB}").replace("\nidentity:", AGENCY + "\nidentity:", 1))
    threshold_tier_reach(folder)
    approve_all(folder)
    loaded = load_collaboration(folder)
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=3000, overlap=0.5, seed=31)
    land(files, settings.landing, COLLAB)
    assert files.customers is not None
    landed = settings.landing / COLLAB / "ad_network" / "impressions" / files.impressions.name
    generated = pd.read_csv(landed)
    generated[generated["impression_time"] >= "2026-01-03"].to_csv(landed, index=False)  # nobody else saw an ad before 3 January
    with landed.open("a") as handle:
        handle.write(f"{TESS},spring_sale,{TESS_TIME}\n")
    with (settings.landing / COLLAB / "retailer" / "customers" / files.customers.name).open("a") as handle:
        handle.write(f"{TESS},bronze,55+,{TESS_VALUE}\n")
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    impressions = pd.read_csv(files.impressions).query("impression_time >= '2026-01-03'").assign(email=lambda f: f["user_email"].str.strip().str.lower())
    customers = pd.read_csv(files.customers).assign(email=lambda f: f["customer_email"].str.strip().str.lower())
    outsider = impressions[~impressions["email"].isin(set(customers["email"]))].iloc[0]  # an ad network user who is not a customer
    out = {"defs": defs, "loaded": loaded, "url": runtime.warehouse.url(), "folder": folder,
           "outsider_times": list(impressions[impressions["email"] == outsider["email"]]["impression_time"])}
    tess = operator(out, f"""select c.lifetime_value from "{{a}}".matched_impressions i join "{{a}}".matched_customers c on c.match_id = i.match_id
                            where i.impression_time = '{TESS_TIME}'""")
    assert tess[0] == "rows" and [float(v) for (v,) in tess[1]] == [TESS_VALUE], tess  # Tess is a shared person, alone on her day
    return out


_runs = itertools.count()


def ask(ctx: dict[str, Any], text: str, runner: str = "ad_network", loaded: LoadedCollaboration | None = None) -> tuple[str, Any]:
    """What the analyst gets: ("rows", result) or ("refused", the one-line message)."""
    loaded = loaded or ctx["loaded"]
    try:
        checked = ad_hoc.check(loaded, runner, text)
        with psycopg.connect(ctx["url"], autocommit=True) as conn:
            return ("rows", ad_hoc_service.execute(conn, loaded, checked, f"attack-{next(_runs)}", text, staged_now(conn, loaded)))
    except ad_hoc.QueryRefused as exc:
        return ("refused", str(exc))


def operator(ctx: dict[str, Any], statement: str) -> tuple[str, Any]:
    """The same question computed without the defence (as the operator, straight on the matched views)."""
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        try:
            return ("rows", conn.execute(statement.replace("{a}", naming.analysis_schema(COLLAB))).fetchall())  # type: ignore[arg-type]
        except psycopg.Error as exc:
            return ("error", exc.sqlstate)


def without_difference_checks(loaded: LoadedCollaboration) -> LoadedCollaboration:
    return dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(update={"difference_checks": DifferenceChecks(enabled=False)}))


def in_list(times: list[str]) -> str:
    return ", ".join(f"'{t}'" for t in times)


# --- 1. the error oracle ---------------------------------------------------------------


def test_an_overflow_inside_an_aggregate_no_longer_tells_a_value(ctx: dict[str, Any]) -> None:
    def attack(x: float) -> str:
        return (f"select s from (select sum(greatest(c.lifetime_value - {x}, 0) * 1e131071 * 1000) as s, count(distinct i.match_id) as u "
                f'from "{{a}}".matched_impressions i join "{{a}}".matched_customers c on c.match_id = i.match_id '
                f"where i.impression_time = '{TESS_TIME}') q where u >= 25")

    # Defence off: the error appears exactly when Tess's value is above the guess; a binary search reads it to the cent.
    assert operator(ctx, attack(TESS_VALUE - 0.01)) == ("error", "22003")
    assert operator(ctx, attack(TESS_VALUE))[0] == "rows"
    # Defence on: arithmetic inside an aggregate is refused whatever the data, and the same arithmetic on the aggregate
    # runs only for groups that passed the threshold, so every guess gets the same empty answer.
    for guess in (TESS_VALUE - 0.01, TESS_VALUE):
        kind, message = ask(ctx, f"select sum((c.lifetime_value - {guess}) * 1e131071 * 1000) {JOIN} where i.impression_time = '{TESS_TIME}'")
        assert kind == "refused" and "(pre-threshold evaluation)" in message
    answers = {repr(ask(ctx, f"select (sum(c.lifetime_value) - {guess}) * 1e131071 * 1000 as s {JOIN} where i.impression_time = '{TESS_TIME}'")[1].rows)
               for guess in (TESS_VALUE - 0.01, TESS_VALUE, 0, 10**6)}
    assert answers == {"[]"}


def test_an_overflow_no_longer_tells_whether_someone_is_a_customer(ctx: dict[str, Any]) -> None:
    def attack(times: list[str]) -> str:
        return (f'select n from (select count(*) + 9223372036854775807 as n, count(distinct i.match_id) as u from "{{a}}".matched_impressions i '
                f"where i.impression_time in ({in_list(times)}) offset 0) q where u >= 25")

    # Defence off: only matched rows are counted, so the overflow says whether the user is a retailer customer.
    assert operator(ctx, attack([TESS_TIME])) == ("error", "22003")
    assert operator(ctx, attack(ctx["outsider_times"]))[0] == "rows"
    # Defence on: the same arithmetic runs after the threshold; a customer and an outsider get the same answer.
    query = "select count(*) + 9223372036854775807 as n from impressions as i where i.impression_time in ({})"
    tess = ask(ctx, query.format(in_list([TESS_TIME])))
    outsider = ask(ctx, query.format(in_list(ctx["outsider_times"])))
    assert tess[0] == outsider[0] == "rows" and tess[1].rows == outsider[1].rows == []


# --- 2. an honest overlap --------------------------------------------------------------------


def test_the_overlap_the_rules_let_members_count_is_the_overlap_released(ctx: dict[str, Any], tmp_path: Path) -> None:
    forget_history(ctx["url"], COLLAB)
    kind, result = ask(ctx, "select count(distinct i.user_email) as n from impressions as i")
    assert kind == "rows"
    counted = result.rows[0]["n"]
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        released = conn.execute(f'select value, ci_low from "{naming.results_schema(COLLAB)}".overlap').fetchall()
    assert released == [(counted, None)]  # exact, and equal to what an ad-hoc count gives
    # The same rules with the overlap "withheld" are refused: the policy would tell two stories.
    folder = tmp_path / COLLAB
    shutil.copytree(ctx["folder"], folder)
    path = folder / "collaboration.yaml"
    path.write_text(path.read_text().replace("overlap_release: exact", "overlap_release: withheld"))
    with pytest.raises(PolicyError, match="matching.overlap_release: overlap_release: withheld contradicts the analysis rules"):
        load_collaboration(folder)


# --- 3. differencing ---------------------------------------------------------------------------


PAIR = (f"select c.loyalty_tier, count(distinct c.customer_email) as people, sum(c.lifetime_value) as value {JOIN} group by 1",
        f"select c.loyalty_tier, count(distinct c.customer_email) as people, sum(c.lifetime_value) as value {JOIN} "
        f"where i.impression_time not in ('{TESS_TIME}') group by 1")


def _by_tier(rows: list[dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    return {r["loyalty_tier"]: (r["people"], r["value"]) for r in rows}


def test_two_ad_hoc_queries_that_differ_by_one_person_cannot_both_be_answered(ctx: dict[str, Any]) -> None:
    forget_history(ctx["url"], COLLAB)
    off = without_difference_checks(ctx["loaded"])
    first, second = (_by_tier(ask(ctx, q, loaded=off)[1].rows) for q in PAIR)
    # Defence off: the answers differ in one row, by exactly Tess: her tier, and her value to the cent.
    differing = {tier: (first[tier][0] - second[tier][0], round(first[tier][1] - second[tier][1], 2)) for tier in first if first[tier] != second[tier]}
    assert differing == {"bronze": (1, TESS_VALUE)}
    # Defence on: the second query is withheld as a whole (which of its rows was too close would say which tier).
    forget_history(ctx["url"], COLLAB)
    kind, before = ask(ctx, PAIR[0])
    assert kind == "rows" and before.suppressed == 0
    outcome = materialize(ctx["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(), run_config=ad_hoc_run_config(COLLAB, "ad_network", PAIR[1]))
    assert outcome.success, outcome.failure
    meta = outcome.metadata["/".join(naming.ad_hoc_key(COLLAB))]
    assert meta["suppressed_rows"] == len(before.rows) and "fewer than 25" in meta["suppressed_because"][0]
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        after = ad_hoc_service.stored_result(conn, COLLAB, "ad_network", outcome.run_id)
    assert after.rows == []


def test_withheld_rows_are_counted_in_every_format(ctx: dict[str, Any]) -> None:
    """`dcr query run --format table|json|csv` of the withheld half of the pair: no rows in any format, and each says how
    many were withheld and why (json in its fields, csv on stderr so that the CSV itself stays clean)."""
    import csv
    import io
    import json
    import os
    import subprocess
    import sys

    forget_history(ctx["url"], COLLAB)
    kind, before = ask(ctx, PAIR[0])
    assert kind == "rows" and before.rows
    said = {}
    for fmt in ("table", "json", "csv"):
        said[fmt] = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "query", "run", COLLAB, "--member", "ad_network", "--format", fmt, PAIR[1]],
                                   capture_output=True, text=True, timeout=300, env={**os.environ, "DCR_POLICIES": str(ctx["folder"].parent)})
        assert said[fmt].returncode == 0, said[fmt].stderr
    n = len(before.rows)
    answer = json.loads(said["json"].stdout)
    assert answer["rows"] == [] and answer["withheld_rows"] == n and "fewer than 25" in " ".join(answer["withheld_because"])
    assert list(csv.reader(io.StringIO(said["csv"].stdout))) == [["loyalty_tier", "people", "value"]]
    assert f"note: {n} rows withheld: " in said["csv"].stderr
    assert f"{n} rows withheld: " in said["table"].stdout


def test_every_runner_counts_as_the_same_adversary(ctx: dict[str, Any]) -> None:
    forget_history(ctx["url"], COLLAB)
    query = "select i.campaign_id, count(*) as impressions from impressions as i {} group by 1"
    kind, agency = ask(ctx, query.format(""), runner="agency")
    assert kind == "rows" and {r["campaign_id"] for r in agency.rows} >= {"spring_sale"}
    kind, network = ask(ctx, query.format(f"where i.impression_time <> '{TESS_TIME}'"))
    assert kind == "rows" and network.suppressed == len(agency.rows) and network.rows == []
    # Identical people sets are not a difference: asking the same again is answered.
    assert ask(ctx, query.format(""), runner="agency")[1].suppressed == 0


def test_a_threshold_query_over_two_parameter_values_cannot_isolate_a_person(ctx: dict[str, Any]) -> None:
    forget_history(ctx["url"], COLLAB)
    key = [naming.analysis_key(COLLAB, "tier_reach"), naming.release_key(COLLAB, "tier_reach")]
    table = f'"{naming.analysis_schema(COLLAB)}".query_tier_reach'
    released, exact = [], []
    for since in ("2025-12-31", "2026-01-02"):  # between the two days, only Tess saw an ad
        outcome = materialize(ctx["defs"], key, instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {"tier_reach": {"since": since}}))
        assert outcome.success, outcome.failure
        meta = outcome.metadata["/".join(naming.release_key(COLLAB, "tier_reach"))]
        with psycopg.connect(ctx["url"], autocommit=True) as conn:
            rows = conn.execute(f'select campaign_id, loyalty_tier, metric, value from "{naming.results_schema(COLLAB)}".tier_reach where release_id = %s',
                                (meta["release_id"],)).fetchall()
            # what the release would print without the difference check: every group over the threshold, exactly
            exact.append({(r[0], r[1]): (r[2], float(r[3]) / r[4]) for r in conn.execute(
                f"select campaign_id, loyalty_tier, buyers, lifetime_value__sum, lifetime_value__count from {table} where dcr_units >= 25").fetchall()})
        released.append(({(r[0], r[1], r[2]): r[3] for r in rows}, meta))
    # Defence off: one group differs, by one buyer, and its average moves by exactly Tess's value.
    changed = [g for g in exact[0] if exact[0][g] != exact[1].get(g)]
    assert changed, (exact[0].get(("spring_sale", "bronze")), exact[1].get(("spring_sale", "bronze")), released)
    assert changed == [("spring_sale", "bronze")]
    before, after = exact[0][changed[0]], exact[1][changed[0]]
    assert before[0] - after[0] == 1 and abs(before[1] * before[0] - after[1] * after[0] - TESS_VALUE) < 1e-6
    # Defence on: the second release is withheld as a whole (which group was too close would tell Tess's tier).
    (first, _), (second, meta) = released
    assert first and second == {}
    assert meta["withheld_groups"] >= 1 and any("the whole release is withheld" in w for w in meta["withheld_because"])


# --- 4. least privilege ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        (naming.staging_schema(COLLAB, "retailer"), "customers"),  # the retailer's tokens
        (naming.matching_schema(COLLAB), "cross_reference"),
        (naming.analysis_schema(COLLAB), "query_campaign_reach"),  # pre-noise aggregates of a DP query
        (naming.analysis_schema(COLLAB), "matched_purchases"),  # a matched view the query does not name
        (naming.results_schema(COLLAB), "campaign_reach"),  # another query's released results
    ],
)
def test_ad_hoc_sql_runs_as_a_role_that_reads_only_the_matched_views_it_names(ctx: dict[str, Any], schema: str, table: str) -> None:
    relation = f'"{schema}"."{table}"'
    if schema != naming.results_schema(COLLAB):  # defence off: the role ad-hoc SQL used to run as reads it
        with psycopg.connect(ctx["url"], autocommit=True) as conn, conn.transaction():
            conn.execute(f'set local role "dcr_{COLLAB}_analysis_builder"')
            conn.execute(f"select * from {relation} limit 1")
    # Defence on: a checked query whose statement was swapped for a read of it is denied (SQLSTATE 42501).
    checked = ad_hoc.check(ctx["loaded"], "ad_network", "select i.campaign_id, count(*) from impressions as i group by 1")
    statement = f"select * from {relation} limit 1"
    tampered = dataclasses.replace(checked, phase1=statement, phase1_without_people=statement)
    with psycopg.connect(ctx["url"], autocommit=True) as conn, pytest.raises(ad_hoc.QueryRefused, match="SQLSTATE 42501"):
        ad_hoc_service.execute(conn, ctx["loaded"], tampered, f"tampered-{next(_runs)}", "x", staged_now(conn, ctx["loaded"]))
    # and the role is gone with its transaction
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        assert conn.execute("select count(*) from pg_roles where rolname like %s", (f"dcr_{COLLAB}_adhoc_%",)).fetchone()[0] == 0


# --- 5. names mean what PostgreSQL makes of them -----------------------------------------------------


def test_an_alias_named_like_a_hidden_column_is_refused(ctx: dict[str, Any]) -> None:
    text = "select i.campaign_id as match_id, count(*) as n from impressions as i group by match_id, i.campaign_id"
    # Defence off: checked as "by campaign" (the alias), PostgreSQL groups by the hidden input column too: a row per person and campaign.
    kind, rows = operator(ctx, 'select i.campaign_id as match_id, count(*) as n from "{a}".matched_impressions as i group by match_id, i.campaign_id')
    assert kind == "rows" and len(rows) > 6 * 25
    # Defence on: the name is ambiguous, and the query is refused saying so.
    kind, message = ask(ctx, text)
    assert kind == "refused" and "(ambiguous names)" in message and "PostgreSQL would group by the input column" in message
    assert ask(ctx, "select upper(campaign_id) as campaign_id, count(*) from impressions group by campaign_id")[0] == "refused"
    assert ask(ctx, "select campaign_id as c, count(*) as n from impressions group by c")[0] == "rows"


# --- limits ---------------------------------------------------------------------------------------


def test_a_policy_can_cap_ad_hoc_queries_per_runner_per_day(ctx: dict[str, Any]) -> None:
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        done = conn.execute(f'select count(*) from "{naming.results_schema(COLLAB)}".ad_hoc__ad_network where ran_at > now() - interval \'1 day\'').fetchone()[0]
    capped = dataclasses.replace(ctx["loaded"], collaboration=ctx["loaded"].collaboration.model_copy(update={"ad_hoc": AdHocLimits(max_queries_per_day=done)}))
    kind, message = ask(ctx, "select i.campaign_id, count(*) from impressions as i group by 1", loaded=capped)
    assert kind == "refused" and "(ad_hoc.max_queries_per_day)" in message
    assert ask(ctx, "select i.campaign_id, count(*) from impressions as i group by 1", runner="agency", loaded=capped)[0] == "rows"


def test_refused_and_withheld_runs_count_against_the_cap_from_the_audit_chain(ctx: dict[str, Any]) -> None:
    """Every run counts: a refused query (through the Dagster asset, which chains refusals with their time) and a
    withheld one, so a runner cannot probe for free. The count is read from the audit chain, not the results table."""
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        before = ad_hoc_service.runs_today(conn, COLLAB, "ad_network")
    refused = materialize(ctx["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(),
                          run_config=ad_hoc_run_config(COLLAB, "ad_network", "select * from customers"))
    assert refused.refused
    forget_history(ctx["url"], COLLAB)
    ask(ctx, PAIR[0])
    assert ask(ctx, PAIR[1])[1].suppressed > 0  # withheld as a whole, and counted
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        assert ad_hoc_service.runs_today(conn, COLLAB, "ad_network") == before + 3
        conn.execute(f'delete from "{naming.results_schema(COLLAB)}".ad_hoc__ad_network')  # the results table is not the clock
        counted = ad_hoc_service.runs_today(conn, COLLAB, "ad_network")
        assert counted == before + 3
    capped = dataclasses.replace(ctx["loaded"], collaboration=ctx["loaded"].collaboration.model_copy(update={"ad_hoc": AdHocLimits(max_queries_per_day=counted)}))
    kind, message = ask(ctx, "select i.campaign_id, count(*) from impressions as i group by 1", loaded=capped)
    assert kind == "refused" and "refused and failed ones count too" in message


def test_release_time_is_recorded_in_utc(ctx: dict[str, Any]) -> None:
    """The retention window is measured by the database clock: rows older than it are forgotten at the next release."""
    forget_history(ctx["url"], COLLAB)
    ask(ctx, PAIR[0])
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        conn.execute("update dcr_meta.released_people set released_at = now() - interval '400 days' where collaboration = %s", (COLLAB,))
    # the earlier row is outside the 365-day window: the pair no longer conflicts, and the old row is dropped
    assert ask(ctx, PAIR[1])[1].suppressed == 0
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        assert conn.execute("select min(released_at) from dcr_meta.released_people where collaboration = %s", (COLLAB,)).fetchone()[0] > \
            dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
