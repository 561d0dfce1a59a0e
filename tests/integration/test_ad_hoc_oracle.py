"""Generated attack: no ad-hoc answer depends on a person who is only in groups under the threshold.

Two collaborations hold the same data, except that ``oracle_b`` has one more
shared person, Pat, with a rare campaign, impressions in 2099 and the largest
lifetime value the contract allows. Every owner allows every scalar function
and every aggregate, so the generator can draw from the whole grammar: all
functions and operators, large and tiny literals, nesting, WHERE, GROUP BY,
HAVING, ORDER BY and LIMIT.

For each accepted query where Pat, in ``oracle_b``, is in no group that passes
the threshold, the analyst must get the same answer from both (the same rows,
or the same refusal or error text). At least 500 such queries run. The same
queries evaluated with the defence switched off (the analyst's expressions
computed for every group, the threshold applied afterwards) must show at
least one difference: the test would catch that oracle.

Difference checks are off here (they are a separate defence, tested in
test_ad_hoc_attacks.py): this test is about evaluation alone.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import sqlglot
from sqlglot import exp

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import ad_hoc, demo_data, naming
from dcr_pipelines.lib.policy import LoadedCollaboration, load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services import ad_hoc as ad_hoc_service

from ..policy_edits import exact_customers
from .conftest import land

A, B = "oracle_a", "oracle_b"
PAT = "pat.oracle@example.org"
PAT_IMPRESSIONS = [(PAT, "zz_rare", "2099-06-15T12:00:00"), (PAT, "zz_rare", "2099-07-01T08:30:00")]
PAT_CUSTOMER = (PAT, "gold", "55+", "1000000")
COMPARABLE = 500
ALL_FUNCTIONS = "[lower, upper, trim, length, substring, concat, round, abs, floor, ceil, coalesce, greatest, least, date_trunc, extract, cast, case]"


def staged_now(conn: Any, loaded: Any) -> Any:
    """What the staged data were built from, as Dagster's event log records it (the gate's input)."""
    import dagster as dg

    from dcr_pipelines.defs import freshness

    return freshness.staged(dg.DagsterInstance.get(), conn, loaded)



def _policy(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    shutil.rmtree(folder / "queries")
    path = folder / "collaboration.yaml"
    text = exact_customers(path.read_text()).replace("    mode: append", "    mode: replace").replace("name: demo", f"name: {name}")
    text = text.split("\napprovals:\n")[0] + "\nschedules: []\n"
    text = text.replace("scalar_functions: [date_trunc, extract, lower, upper, round, coalesce]", f"scalar_functions: {ALL_FUNCTIONS}")
    text = text.replace("aggregate: [sum, avg], range: [0, 1000000]", "aggregate: [count, count_distinct, sum, sum_distinct, avg, min, max, stddev, variance], range: [0, 1000000]")
    text += "difference_checks: {enabled: false}\n"
    path.write_text(text)
    approve_all(folder)
    return folder


@pytest.fixture(scope="module")
def pair(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("oracle_policies")
    loaded = {name: load_collaboration(_policy(root, name)) for name in (A, B)}
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / "oracle", rows=400, overlap=0.5, seed=11)
    for name in (A, B):
        land(files, settings.landing, name)
    with (settings.landing / B / "ad_network" / "impressions" / files.impressions.name).open("a") as handle:
        handle.writelines(",".join(row) + "\n" for row in PAT_IMPRESSIONS)
    assert files.customers is not None
    with (settings.landing / B / "retailer" / "customers" / files.customers.name).open("a") as handle:
        handle.write(",".join(PAT_CUSTOMER) + "\n")
    defs = build_definitions(settings)
    for name in (A, B):
        outcome = materialize(defs, collaboration_keys(defs, name, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(name, {}))
        assert outcome.success, outcome.failure
    url = runtime.warehouse.url()
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            f'select x.unit from "{naming.matching_schema(B)}".cross_reference x '
            f'join "{naming.raw_schema(B, "ad_network")}".identities i on i.token = x.ad_network_token where i.identifier = %s',
            (PAT,),
        ).fetchall()
    assert len(found) == 1, "Pat must be a shared person in oracle_b"
    return {"loaded": loaded, "url": url, "pat": int(found[0][0])}


# --- the generator ---------------------------------------------------------------

I_KEYS = [
    "i.campaign_id", "lower(i.campaign_id)", "upper(i.campaign_id)", "trim(i.campaign_id)", "substring(i.campaign_id, 1, 4)",
    "substring(i.campaign_id from 3 for 0)", "concat(i.campaign_id, '-x')", "i.campaign_id || '_'", "coalesce(i.campaign_id, 'none')",
    "length(i.campaign_id)", "date_trunc('month', i.impression_time)", "date_trunc('year', i.impression_time)",
    "date_trunc('millennium', i.impression_time)", "extract(year from i.impression_time)", "extract(epoch from i.impression_time)",
    "extract(isodow from i.impression_time)", "cast(i.impression_time as date)", "cast(i.impression_time as text)",
    "greatest(i.campaign_id, 'm')", "least(i.impression_time, '2030-01-01')", "i.impression_time",
    "case when i.campaign_id like 'zz%' then 'rare' when i.campaign_id ilike '%SALE' then 'sale' else 'other' end",
]
C_KEYS = [
    "c.loyalty_tier", "c.age_band", "upper(c.age_band)", "concat(c.loyalty_tier, c.age_band)",
    "case when c.age_band in ('45-54', '55+') then 'older' else 'younger' end",
]
VALUE = ["c.lifetime_value", "round(c.lifetime_value, 2)", "round(c.lifetime_value, -3)", "floor(c.lifetime_value)", "ceil(c.lifetime_value)",
         "abs(c.lifetime_value)", "coalesce(c.lifetime_value, 0)", "greatest(c.lifetime_value, 10)", "least(c.lifetime_value, 999999.99)",
         "case when c.lifetime_value > 500000 then c.lifetime_value else 0 end", "cast(c.lifetime_value as text)"]
LITERALS = ["1", "2", "7", "0.5", "1e-300", "1e300", "123456.789", "-98765.4321", "9223372036854775807", "4611686018427387904",
            "1e131066", "1e131067", "-1e131067", "0.000001", "1e-16000", "1000000", "999999.99"]
I_CONDITIONS = [
    "i.campaign_id = 'zz_rare'", "i.campaign_id <> 'spring_sale'", "i.campaign_id in ('zz_rare', 'summer_launch', 'new_year')",
    "i.impression_time >= '2026-03-01'", "i.impression_time < '2099-01-01'", "extract(year from i.impression_time) = 2099",
    "i.campaign_id like 'zz%'", "lower(i.campaign_id) like '%sale'", "i.impression_time between '2026-01-01' and '2099-12-31'",
    "i.campaign_id is not null", "date_trunc('month', i.impression_time) = '2099-06-01'", "length(i.campaign_id) > 7",
    "substring(i.campaign_id, 1, 2) = 'zz'", "i.impression_time > '2026-06-30 23:59:59'", "cast(i.impression_time as date) = '2099-06-15'",
]
C_CONDITIONS = ["c.age_band = '55+'", "c.loyalty_tier in ('gold', 'silver')", "not (c.loyalty_tier = 'bronze')", "c.age_band like '1%'",
                "c.loyalty_tier >= 'gold'"]


def _aggregate(rng: random.Random, joined: bool) -> str:
    choices = ["count(*)", "count(distinct i.user_email)"]
    if joined:
        value = rng.choice(VALUE)
        choices += ["count(distinct c.customer_email)", f"sum({value})", f"avg({value})", f"min({value})", f"max({value})",
                    f"stddev({value})", f"variance({value})", f"sum(distinct {value})", f"count({value})"] * 2
    return rng.choice(choices)


def _metric(rng: random.Random, joined: bool, depth: int = 0) -> str:
    """An output expression over aggregates: the analyst's arithmetic, with extreme literals and nesting."""
    agg = _aggregate(rng, joined)
    lit, lit2 = rng.choice(LITERALS), rng.choice(LITERALS)
    forms = [
        agg, f"{agg} * {lit}", f"({agg} - {lit}) * {lit2}", f"{agg} + {lit}", f"{agg} / {rng.choice(['2', '0.001', '1e-300', '7'])}",
        f"round({agg}, {rng.choice(['0', '2', '-3'])})", f"abs({agg} - {lit})", f"greatest({agg}, {lit})", f"least({agg} * {lit}, {lit2})",
        f"coalesce({agg}, {lit})", f"cast({agg} as bigint)", f"{agg} % 7", f"floor({agg} / 3)", f"ceil({agg} * {lit})",
        f"case when {agg} > {lit} then {agg} * {lit2} else 0 end",
    ]
    if joined and rng.random() < 0.15:  # the reported attack: overflows exactly when one person's value is large
        return f"{rng.choice(['sum', 'avg', 'max'])}({rng.choice(VALUE[:3])}) * 1e131066"
    if depth < 2 and rng.random() < 0.3:
        forms.append(f"({_metric(rng, joined, depth + 1)}) + ({_metric(rng, joined, depth + 1)}) * {lit}")
    return rng.choice(forms)


def _condition(rng: random.Random, joined: bool) -> str:
    pool = I_CONDITIONS + (C_CONDITIONS if joined else [])
    first = rng.choice(pool)
    if rng.random() < 0.4:
        return f"({first} {rng.choice(['and', 'or'])} {rng.choice(pool)})"
    if rng.random() < 0.1:
        return f"not ({first})"
    return first


def generate(rng: random.Random) -> str:
    joined = rng.random() < 0.6
    source = "from impressions as i" + (" inner join customers as c on c.customer_email = i.user_email" if joined else "")
    pool = I_KEYS + (C_KEYS if joined else [])
    keys = rng.sample(pool, rng.choice([0, 1, 1, 1, 2]))
    if rng.random() < 0.7 and not any("campaign" in k or "impression_time" in k for k in keys):
        keys.append(rng.choice(I_KEYS[:4] + I_KEYS[10:14]))  # mostly keys that put Pat in a group of his own
    metrics = [_metric(rng, joined) for _ in range(rng.choice([1, 1, 2, 3]))]
    items = [f"{k} as k_{n}" for n, k in enumerate(keys)] + [f"{m} as m_{n}" for n, m in enumerate(metrics)]
    text = f"select {', '.join(items)} {source}"
    if rng.random() < 0.5:
        text += f" where {_condition(rng, joined)}"
    if keys:
        text += " group by " + ", ".join(str(i) for i in range(1, len(keys) + 1))
    if rng.random() < 0.25:
        text += f" having {_aggregate(rng, joined)} {rng.choice(['>', '>=', '<', '<>'])} {rng.choice(['0', '30', '1e300', '-1'])}"
    if rng.random() < 0.3:
        text += " order by " + ", ".join(f"{i} {rng.choice(['asc', 'desc'])}" for i in range(1, len(items) + 1))
        if rng.random() < 0.5:
            text += f" limit {rng.choice([1, 2, 5])}"
    return text


# --- evaluating ------------------------------------------------------------------


def _rows_key(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(sorted(json.dumps(r, sort_keys=True, default=str) for r in rows))


def answer(conn: psycopg.Connection, loaded: LoadedCollaboration, text: str, tag: str) -> tuple[str, Any]:
    """What the analyst gets: the rows, or the one-line refusal or error."""
    try:
        checked = ad_hoc.check(loaded, "ad_network", text)
        result = ad_hoc_service.execute(conn, loaded, checked, tag, text, staged_now(conn, loaded))
    except ad_hoc.QueryRefused as exc:
        return ("refused", str(exc))
    return ("rows", _rows_key(result.rows))


def naive_sql(checked: ad_hoc.CheckedQuery) -> str:
    """The defence switched off: the analyst's expressions computed for every group, the threshold applied afterwards
    (OFFSET 0 keeps PostgreSQL from pushing the threshold into the grouping, as it may or may not do)."""
    phase1 = sqlglot.parse_one(checked.phase1_without_people, read="postgres")
    computed = {item.alias: item.unalias() for item in phase1.expressions}

    def inline(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Column) and node.table == "g":
            return computed[node.name].copy()
        return node

    outputs = [sqlglot.parse_one(o, read="postgres").transform(inline) for o in checked.outputs]
    inner = phase1.copy()
    inner.set("expressions", [exp.alias_(o, name, quoted=True) for o, name in zip(outputs, checked.columns, strict=False)] + [exp.alias_(computed[ad_hoc.UNITS].copy(), ad_hoc.UNITS, quoted=True)])
    inner.set("having", exp.Having(this=sqlglot.parse_one(checked.having, read="postgres").transform(inline)) if checked.having else None)
    inner.set("offset", exp.Offset(expression=exp.Literal.number(0)))
    names = ", ".join(f'"{n}"' for n in checked.columns)
    return f'select {names} from ({inner.sql(dialect="postgres")}) as q where "{ad_hoc.UNITS}" >= {checked.min_distinct_units}'


def naive_answer(conn: psycopg.Connection, statement: str) -> tuple[str, Any]:
    try:
        with conn.transaction():
            cursor = conn.execute(statement)  # type: ignore[arg-type]
            names = [d.name for d in cursor.description or ()]
            return ("rows", _rows_key([dict(zip(names, (str(v) for v in row), strict=False)) for row in cursor.fetchall()]))
    except psycopg.Error as exc:
        return ("error", exc.sqlstate)


def pat_in_a_released_group(conn: psycopg.Connection, checked: ad_hoc.CheckedQuery, pat: int) -> bool:
    with conn.transaction():
        groups = conn.execute(checked.phase1).fetchall()  # type: ignore[arg-type]
    return any(pat in (g[-1] or []) for g in groups)


def test_no_answer_depends_on_a_person_below_the_threshold(pair: dict[str, Any]) -> None:
    rng = random.Random(20261130)
    compared = naive_differences = accepted = 0
    functions_seen: set[str] = set()
    with psycopg.connect(pair["url"], autocommit=True) as conn:
        for n in range(6000):
            text = generate(rng)
            try:
                checked_b = ad_hoc.check(pair["loaded"][B], "ad_network", text)
            except ad_hoc.QueryRefused:
                continue  # the checker decides from the text and the policy alone: the same for both
            accepted += 1
            if pat_in_a_released_group(conn, checked_b, pair["pat"]):
                continue  # Pat legitimately changes a released row
            got_a = answer(conn, pair["loaded"][A], text, f"oracle-a-{n}")
            got_b = answer(conn, pair["loaded"][B], text, f"oracle-b-{n}")
            assert got_a == got_b, f"the answer depends on Pat, who is only in groups under the threshold:\n{text}\n{got_a}\n{got_b}"
            compared += 1
            functions_seen |= {type(node).__name__ for node in sqlglot.parse_one(text, read="postgres").walk()}
            checked_a = ad_hoc.check(pair["loaded"][A], "ad_network", text)
            if naive_answer(conn, naive_sql(checked_a)) != naive_answer(conn, naive_sql(checked_b)):
                naive_differences += 1

            if compared >= COMPARABLE:
                break
    assert compared >= COMPARABLE, f"only {compared} comparable queries of {accepted} accepted"
    # The grammar was covered: every scalar function and aggregate, arithmetic and every clause.
    expected = {"Lower", "Upper", "Trim", "Length", "Substring", "Concat", "DPipe", "Round", "Abs", "Floor", "Ceil", "Coalesce", "Greatest",
                "Least", "TimestampTrunc", "Extract", "Cast", "Case", "Count", "Sum", "Avg", "Min", "Max", "Stddev", "Variance",
                "Mul", "Add", "Sub", "Div", "Mod", "Where", "Group", "Having", "Order", "Limit", "Like", "ILike", "In", "Between", "Not"}
    assert expected <= functions_seen, expected - functions_seen
    # The old evaluation fails the same property: the test has teeth.
    assert naive_differences > 0
    print(f"{accepted} accepted, {compared} compared, {naive_differences} would have differed under the old evaluation")
