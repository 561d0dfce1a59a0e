"""Running a checked ad-hoc query: least privilege, two phases, noise or difference checks, results for the runner only.

One transaction per run, under the collaboration's lock; every run, refused or
failed included, counts against ``ad_hoc.max_queries_per_day`` (counted from
the audit chain, whose entries carry the time of the run):

1. a role that exists only inside this transaction and may read only the
   matched views of the datasets the query names (never tokens, the
   cross-reference, pre-noise tables or other results);
2. phase 1 as that role (``checker`` guarantees it cannot fail on any data);
3. **differential privacy** (a dataset read is under the differential_privacy
   rule): phase 1 returns each group's sums of bounded per-person
   contributions; the noise (``lib/privacy/ad_hoc.py``) and the charge to the
   runner's budget go through the ledger in one transaction, and an identical
   query over the same data versions is answered from the store at no cost.
   **Exact** (aggregation rule): phase 1 returns the groups that pass the
   threshold with their people; the difference check compares every one of
   them with every row released earlier, and if any is too close the whole
   result is withheld (which group would say something); otherwise all of
   them are recorded before phase 2 runs, released or not;
4. phase 2 over the released groups only: the analyst's arithmetic, HAVING,
   ORDER BY and LIMIT, evaluated so that no error escapes (an expression that
   fails for a group is NULL for it, a HAVING that fails drops it);
5. the result and its audit-chain entry (time of the run, the SHA-256 of the
   recorded people sets) are stored, the role is dropped, everything commits.

Database errors reach the analyst as one generic line with the SQLSTATE
only: the message text could quote a value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..lib import audit, naming
from ..lib.ad_hoc.checker import PEOPLE, UNITS, CheckedQuery, QueryRefused, hashable, query_sha256
from ..lib.audit import rows_digest
from ..lib.policy import LoadedCollaboration
from ..lib.policy.models import Budget
from ..lib.privacy import ad_hoc as ad_hoc_noise
from ..lib.privacy import difference
from ..store import access, approvals, audit_chain, builder, footprints, ledger, migrations, stages
from ..store import matching as store_matching
from . import ingest as ingest_lib

CAP_RULE = "ad_hoc.max_queries_per_day"


@dataclass(frozen=True)
class AdHocResult:
    columns: list[str]
    rows: list[dict[str, Any]]
    groups: int = 0  # groups that passed the threshold (exact) or were released (dp)
    suppressed: int = 0  # exact: rows withheld by the difference check (all of them, when any is)
    reasons: list[str] = field(default_factory=list)
    audit_chain_sha256: str = ""
    mode: str = "exact"
    epsilon: float = 0.0  # charged by this run (0 when answered from the store)
    release_id: str | None = None  # dp: the release that holds the noised answer
    cached: bool = False  # dp: answered from the store (an identical query over the same data)
    budget: ledger.BudgetStatus | None = None
    release_audit: dict[str, Any] = field(default_factory=dict)  # dp: the release's chain entry, for the event log
    failure: str | None = None  # the run failed after phase 1 (stored and counted, nothing released)


def results_table(runner: str) -> str:
    return f"ad_hoc__{runner}"


def _plain_value(value: object) -> object:
    """A JSON value: numbers as floats where a float holds them, otherwise (huge, NaN, infinite) as exact text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return str(value)
    return number if math.isfinite(number) else str(value)


def _temporary_role(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery) -> sql.Identifier:
    """A role for this run only: SELECT on the matched views the query names, nothing else (dropped before commit)."""
    name = access.role_name(loaded.name, "adhoc", secrets.token_hex(4))
    role = sql.Identifier(name)
    schema = naming.analysis_schema(loaded.name)
    conn.execute(sql.SQL("create role {} nologin noinherit").format(role))
    conn.execute(sql.SQL("grant {} to current_user").format(role))
    conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(schema), role))
    for dataset in checked.datasets:
        conn.execute(sql.SQL("grant select on {} to {}").format(sql.Identifier(schema, f"matched_{dataset}"), role))
    return role


def _drop_role(conn: psycopg.Connection, role: sql.Identifier) -> None:
    conn.execute(sql.SQL("drop owned by {}").format(role))
    conn.execute(sql.SQL("drop role {}").format(role))


def _as_role(conn: psycopg.Connection, role: sql.Identifier, timeout_s: int, statement: str, params: Any = None) -> psycopg.Cursor[Any]:
    """Run one statement as ``role`` inside a savepoint; database errors become one generic refusal."""
    try:
        with conn.transaction():
            conn.execute("set local standard_conforming_strings = on")  # a backslash in a literal is a backslash, as checked
            conn.execute(sql.SQL("set local role {}").format(role))
            conn.execute(sql.SQL("set local statement_timeout = {}").format(sql.Literal(f"{int(timeout_s)}s")))
            cursor = conn.execute(statement, params)
            conn.execute("reset role")
            return cursor
    except psycopg.errors.QueryCanceled:
        raise QueryRefused("resources", f"the query ran longer than {timeout_s} s and was stopped") from None
    except psycopg.Error as exc:  # the message could quote a value; the SQLSTATE is all the analyst gets
        raise QueryRefused("run time", f"the query failed in the database (SQLSTATE {exc.sqlstate}); details are withheld because they can depend on rows") from None


def _planned(conn: psycopg.Connection, role: sql.Identifier, timeout_s: int, checked: CheckedQuery) -> list[str]:
    """Both phases planned by PostgreSQL without reading a row; returns phase 2's input types.

    A type or name error (SQLSTATE class 42: a function that does not exist for these types, say) is the same for
    every database, so it is refused here, before anything is evaluated or recorded, with PostgreSQL's own message
    (it names types and functions, never values).
    """
    try:
        with conn.transaction():
            conn.execute("set local standard_conforming_strings = on")
            conn.execute(sql.SQL("set local role {}").format(role))
            conn.execute(sql.SQL("set local statement_timeout = {}").format(sql.Literal(f"{int(timeout_s)}s")))
            cursor = conn.execute(f'select * from ({checked.phase1}) as "dcr_plan" limit 0')
            types = _phase2_types(conn, checked, [d.type_code for d in cursor.description or ()])
            conn.execute(checked.phase2(types), [[] for _ in types])
            conn.execute("reset role")
    except psycopg.errors.QueryCanceled:
        raise QueryRefused("resources", f"the query could not be planned within {timeout_s} s") from None
    except psycopg.Error as exc:
        if exc.sqlstate and exc.sqlstate.startswith("42") and exc.sqlstate != "42501":  # (not a permission: that names a relation)
            raise QueryRefused("types", f"PostgreSQL cannot run the query's expressions: {exc.diag.message_primary}") from None
        raise QueryRefused("run time", f"the query failed in the database (SQLSTATE {exc.sqlstate}); details are withheld because they can depend on rows") from None
    return types


def _phase2_types(conn: psycopg.Connection, checked: CheckedQuery, oids: list[int]) -> list[str]:
    """Array types of phase 2's inputs: the group number, the keys and aggregates as phase 1 types them (noised
    aggregates: counts bigint, sums and averages numeric)."""
    if checked.dp is not None:
        aggregates = ["bigint" if a.function.startswith("count") else "numeric" for a in checked.dp.aggregates]
        return ["bigint", *_type_names(conn, oids[: checked.keys]), *aggregates]
    return ["bigint", *_type_names(conn, oids[: checked.keys + checked.aggregates])]


def _type_names(conn: psycopg.Connection, oids: list[int]) -> list[str]:
    names: dict[int, str] = dict(conn.execute("select o, format_type(o, null) from unnest(%s::oid[]) as o", (oids,)).fetchall())
    return [str(names[o]) for o in oids]


def runs_today(conn: psycopg.Connection, collab: str, runner: str) -> int:
    """Ad-hoc runs of ``runner`` in the last 24 hours, accepted, refused or failed, as the audit chain records them
    (refusals by the cap itself do not count, or a capped runner would never get out)."""
    schema = naming.results_schema(collab)
    audit_chain.ensure(conn, schema)
    row = conn.execute(
        sql.SQL(
            "select count(*) from {} where kind in ('ad_hoc', 'refusal') and entry->>'runner' = %s and entry ? 'ran_at' "
            "and (entry->>'ran_at')::timestamptz > now() - interval '1 day' and coalesce(entry->>'rule', '') <> %s"
        ).format(sql.Identifier(schema, audit_chain.TABLE)),
        (runner, CAP_RULE),
    ).fetchone()
    return int(row[0]) if row else 0


def _runner_lock(conn: psycopg.Connection, collab: str, runner: str) -> None:
    """One run of a runner at a time past this point, so that the daily cap counts every run (taken before any other lock)."""
    conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-ad_hoc-runner:{collab}:{runner}",))


def _check_cap(conn: psycopg.Connection, loaded: LoadedCollaboration, runner: str) -> None:
    cap = loaded.collaboration.ad_hoc.max_queries_per_day
    if cap is not None and runs_today(conn, loaded.name, runner) >= cap:
        raise QueryRefused(CAP_RULE, f"{runner} has run {cap} ad-hoc queries in the last 24 hours (refused and failed ones count too), "
                                     "the most the policy allows")


def record_refusal(conn: psycopg.Connection, loaded: LoadedCollaboration, run_id: str, runner: str, text: str, rule: str, datasets: list[str]) -> audit.ChainRow:
    """A refused run, in the audit chain with its time: it counts against the daily cap like an accepted one."""
    now = conn.execute("select now()").fetchone()[0]  # type: ignore[index]
    return audit_chain.append(conn, naming.results_schema(loaded.name), loaded.name, "refusal", run_id,
                              {"run_id": run_id, "runner": runner, "query_sha256": query_sha256(text), "rule": rule, "datasets": datasets,
                               "ran_at": audit.timestamp(now)})


def read_versions(conn: psycopg.Connection, loaded: LoadedCollaboration, datasets: tuple[str, ...]) -> dict[str, Any]:
    """What an ad-hoc query reads, as versions: each dataset's staging build and the cross-reference it joins through."""
    match = store_matching.previous_match(conn, loaded.name)
    return {**{f"staging/{d}": stages.last_build(conn, loaded.name, f"staging/{d}") for d in datasets},
            "cross_reference": match[0] if match else None}


def runner_budget(loaded: LoadedCollaboration, runner: str) -> Budget:
    for budget in loaded.collaboration.budgets:
        if budget.consumer == runner:
            return budget
    raise QueryRefused("differential_privacy rule, budget",
                       f"{runner} has no privacy budget in {loaded.name}, and a differentially private query is charged to its runner's budget "
                       "(collaboration.yaml: budgets)")


def dp_cache_key(checked: CheckedQuery, text: str, versions: dict[str, Any]) -> str:
    assert checked.dp is not None
    return ledger.cache_key(f"ad_hoc:{checked.runner}:{query_sha256(text)}", {"epsilon": repr(checked.dp.epsilon)}, versions)


@dataclass(frozen=True)
class AdHocDryRun:
    """What running a checked query would cost now: its noise (dp), the runner's budget, the daily cap; nothing runs."""

    noise: ad_hoc_noise.AdHocNoise | None
    status: ledger.BudgetStatus | None
    cached: bool  # an identical query over the same data was answered before: the store answers, free
    runs_today: int
    cap: int | None

    @property
    def fits(self) -> bool:
        if self.cap is not None and self.runs_today >= self.cap:
            return False
        if self.noise is None or self.cached:
            return True
        assert self.status is not None
        return self.noise.epsilon <= self.status.remaining + 1e-12 and (self.noise.delta == 0 or self.noise.delta <= self.status.delta_remaining + 1e-18)


def dry_run(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, text: str, staged: ingest_lib.Staged) -> AdHocDryRun:
    """The cost of running ``checked`` now, against what its runner has left; draws nothing, charges nothing, reads no row."""
    refuse_unready(conn, loaded, staged)
    runs, cap = runs_today(conn, loaded.name, checked.runner), loaded.collaboration.ad_hoc.max_queries_per_day
    if checked.dp is None:
        return AdHocDryRun(None, None, False, runs, cap)
    budget = runner_budget(loaded, checked.runner)
    schema = naming.results_schema(loaded.name)
    status = ledger.budget_status(conn, schema, budget)
    cached = ledger.stored_release_id(conn, schema, dp_cache_key(checked, text, read_versions(conn, loaded, checked.datasets))) is not None
    return AdHocDryRun(ad_hoc_noise.plan(checked.dp), status, cached, runs, cap)


def refuse_unready(conn: psycopg.Connection, loaded: LoadedCollaboration, staged: ingest_lib.Staged) -> None:
    """No answer from staged data a newer upload or a withdraw has replaced (it would use rows that are no longer the
    data); ``staged`` is Dagster's record of what staging was built from (``defs/freshness.py``)."""
    try:
        builder.verify(conn, loaded)  # the matched views are the dbt login's: nothing else of it runs as the query's reader
    except builder.BuilderTampered as exc:
        raise QueryRefused("integrity", str(exc)) from None
    unapproved = approvals.unbacked(conn, loaded)
    if unapproved:
        raise QueryRefused("approval", f"{unapproved[0]}; nothing was read or charged")
    if staged.stale:
        raise QueryRefused("stale data", f"{', '.join(staged.stale)} changed since the data was staged ({staged.describe()}); nothing was "
                           f"read or charged: run `dcr run {loaded.name}` first, then ask again")


def execute(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, staged: ingest_lib.Staged,
            timeout_s: int = 120) -> AdHocResult:
    """Run a checked query (see the module docstring); store its rows for the runner only; return them."""
    refuse_unready(conn, loaded, staged)
    if checked.dp is not None:
        return _execute_dp(conn, loaded, checked, run_id, text, timeout_s)
    c = loaded.name
    checks = loaded.collaboration.difference_checks
    with conn.transaction():
        _runner_lock(conn, c, checked.runner)
        footprints.lock(conn, c)
        _check_cap(conn, loaded, checked.runner)
        role = _temporary_role(conn, loaded, checked)
        types = _planned(conn, role, timeout_s, checked)
        cursor = _as_role(conn, role, timeout_s, checked.phase1 if checks.enabled else checked.phase1_without_people)
        description = list(cursor.description or ())
        groups = cursor.fetchall()
        width = checked.keys + checked.aggregates
        rows: list[dict[str, Any]] = []
        reasons: list[str] = []
        recorded: list[tuple[int, difference.People]] = []
        withheld = 0
        if checks.enabled:
            people_at = [d.name for d in description].index(PEOPLE)
            sets = [difference.people(row[people_at] or []) for row in groups]
            verdicts = footprints.check(conn, c, sets, checked.min_distinct_units, checks.retention_days, source="ad_hoc", source_id=run_id)
            too_close = [v for v in verdicts if not v.released]
            if too_close:  # which group was too close would say something: the whole result is withheld
                withheld = len(groups)
                reasons = sorted({footprints.describe(v.withheld_because, checked.min_distinct_units) for v in too_close if v.withheld_because})
            else:  # every evaluated group, before phase 2 can drop any of them
                recorded = list(enumerate(sets))
                footprints.record(conn, c, "ad_hoc", run_id, recorded, checks.retention_days)
        failure = None
        if not withheld:
            inputs = [list(range(len(groups)))] + [[g[col] for g in groups] for col in range(width)]
            try:
                names, released = phase2(conn, role, timeout_s, checked, types, inputs)
            except QueryRefused as exc:  # a timeout: the run is stored as failed, its groups stay recorded
                failure, names, released = str(exc), [], []
            rows = [dict(zip(names, (_plain_value(v) for v in row), strict=False)) for _, row in released]
        result = AdHocResult(list(checked.columns), rows, len(groups), withheld, reasons, failure=failure)
        chained = _store(conn, loaded, checked, run_id, text, result, recorded)
        result = dataclasses.replace(result, audit_chain_sha256=chained.chain_sha256)
        _drop_role(conn, role)
    return result


def phase2(conn: psycopg.Connection, role: sql.Identifier, timeout_s: int, checked: CheckedQuery, types: list[str],
           inputs: list[list[Any]]) -> tuple[list[str], list[tuple[int, tuple[Any, ...]]]]:
    """The analyst's expressions over the released groups, so that no error escapes: (output names, [(group, values)]).

    First as one statement; if that fails, each group alone, and in a failing group each expression alone: an
    expression that fails is NULL for that group, a HAVING that fails (or is NULL) drops it. ORDER BY, LIMIT and
    OFFSET then run over values that cannot fail.
    """
    names = list(checked.columns)
    try:
        cursor = _as_role(conn, role, timeout_s, checked.phase2(types), inputs)
        return names, [(int(row[-1]), tuple(row[:-1])) for row in cursor.fetchall()]
    except QueryRefused as exc:
        if exc.rule != "run time":
            raise
    groups: list[tuple[int, tuple[Any, ...]]] = []
    found: dict[int, int] = {}  # output position -> type oid, from any group where it could be computed
    for i in range(len(inputs[0])):
        single = [[column[i]] for column in inputs]
        if checked.having and not _total(conn, role, timeout_s, checked.select_one(types, checked.having), single)[0]:
            continue
        values: list[Any] = []
        for k, expression in enumerate(checked.outputs):
            value, oid = _total(conn, role, timeout_s, checked.select_one(types, expression), single)
            values.append(value)
            if oid is not None:
                found.setdefault(k, oid)
        groups.append((int(inputs[0][i]), tuple(values)))
    if not groups:
        return names, []
    oids = [found.get(k, 25) for k in range(len(names))]  # an output that failed everywhere is all NULL: text
    arrays = [[g for g, _ in groups]] + [[v[k] for _, v in groups] for k in range(len(names))]
    cursor = _as_role(conn, role, timeout_s, checked.ordered(["bigint", *_type_names(conn, oids)]), arrays)
    return names, [(int(row[0]), tuple(row[1:])) for row in cursor.fetchall()]


def _total(conn: psycopg.Connection, role: sql.Identifier, timeout_s: int, statement: str, params: list[list[Any]]) -> tuple[Any, int | None]:
    """One value and its type, or (None, None) where the database could not compute it for this group."""
    try:
        cursor = _as_role(conn, role, timeout_s, statement, params)
    except QueryRefused as exc:
        if exc.rule != "run time":
            raise
        return None, None
    row = cursor.fetchone()
    return (row[0] if row else None), (cursor.description[0].type_code if cursor.description else None)


def _interval_columns(checked: CheckedQuery) -> list[tuple[str, int, int | None]]:
    """Outputs that are one noised aggregate (or its ROUND): (output name, aggregate index, digits rounded to)."""
    out = []
    for name, expression in zip(checked.columns, checked.outputs, strict=True):
        match = re.fullmatch(r'"g"\."a(\d+)"', expression) or re.fullmatch(r'ROUND\("g"\."a(\d+)"(?:, (-?\d+))?\)', expression)
        if match:
            digits = match.group(2) if match.lastindex and match.lastindex >= 2 else None
            out.append((name, int(match.group(1)), int(digits) if digits is not None else (0 if expression.startswith("ROUND") else None)))
    return out


def dp_columns(checked: CheckedQuery) -> list[str]:
    """The output columns of a DP query: the analyst's, each noised aggregate followed by its 95% interval."""
    intervals = {name for name, _, _ in _interval_columns(checked)}
    out: list[str] = []
    for name in checked.columns:
        out.append(name)
        if name in intervals:
            out += [f"{name}_ci_low", f"{name}_ci_high"]
    return out


def _execute_dp(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, timeout_s: int) -> AdHocResult:
    assert checked.dp is not None
    c = loaded.name
    schema = naming.results_schema(c)
    columns = dp_columns(checked)
    with conn.transaction():
        # The runner's lock for the cap, not the footprints lock: a threshold release takes the budget lock and then the
        # footprints lock, so taking them the other way round here could deadlock with it.
        _runner_lock(conn, c, checked.runner)
        _check_cap(conn, loaded, checked.runner)
        budget = runner_budget(loaded, checked.runner)
        ledger.ensure_tables(conn, schema)
        _ensure_results_table(conn, loaded, checked.runner)
        versions = read_versions(conn, loaded, checked.datasets)
        key = dp_cache_key(checked, text, versions)
        noise = ad_hoc_noise.plan(checked.dp)
        role = _temporary_role(conn, loaded, checked)
        types = _planned(conn, role, timeout_s, checked)
        made: dict[str, Any] = {}

        def draw() -> list[dict[str, Any]]:
            """Phase 1, noise (opendp), then the analyst's phase 2 over the noised groups only (post-processing).

            Called by the ledger once the budget is known to cover the query (a query it cannot cover reads no row)
            and only for a query not answered before; if anything fails from here on (a timeout of phase 1 included,
            which could depend on the data), the query is charged anyway.
            """
            assert checked.dp is not None
            cursor = _as_role(conn, role, timeout_s, checked.phase1)
            names = [d.name for d in cursor.description or ()]
            groups = cursor.fetchall()
            released = ad_hoc_noise.release(noise, checked.dp, names, groups, checked.keys)
            inputs = [list(range(len(released)))] + [[g.keys[k] for g in released] for k in range(checked.keys)]
            inputs += [[g.values[j] for g in released] for j in range(len(checked.dp.aggregates))]
            out_names, rows = phase2(conn, role, timeout_s, checked, types, inputs) if released else (list(checked.columns), [])
            wanted = _interval_columns(checked)
            result = []
            for group, values in rows:
                row = dict(zip(out_names, (_plain_value(v) for v in values), strict=False))
                for name, j, digits in wanted:
                    interval = released[group].intervals[j - 1]
                    low, high = interval if interval is not None else (None, None)
                    if digits is not None and low is not None and high is not None:
                        low, high = round(low, digits), round(high, digits)
                    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = low, high
                result.append({k: row.get(k) for k in columns})
            made["groups"] = len(released)
            return result

        def store_rows(conn: psycopg.Connection, release_id: str, rows: list[dict[str, Any]]) -> None:
            _insert(conn, loaded, checked, run_id, text, columns, rows, mode="dp", epsilon=noise.epsilon, release_id=release_id)

        try:
            stored = ledger.charge_release(
                conn, schema, collaboration=c, query_name=results_table(checked.runner), budget=budget, key=key,
                params={"epsilon": repr(checked.dp.epsilon)}, input_versions=versions, cost=noise.epsilon, delta=noise.delta,
                draw=draw, store_rows=store_rows, receivers=(checked.runner,), query_sha256=query_sha256(text), run_id=run_id,
            )
        except ledger.BudgetExhausted as exc:
            raise QueryRefused("budget", str(exc)) from None
        except ledger.ReleaseFailed as exc:  # charged: the failed run is stored and chained with the charge
            reference = str(exc).rsplit("(reference ", 1)[-1].rstrip(")")
            message = (f"the query failed in the database or ran longer than {timeout_s} s, and was charged epsilon {noise.epsilon:.4g}: "
                       f"whether it fails could depend on the data; the operator's log has the details (reference {reference})")
            failed = AdHocResult(columns, [], mode="dp", failure=message, epsilon=noise.epsilon)
            _insert(conn, loaded, checked, run_id, text, columns, [], mode="dp", epsilon=noise.epsilon, failure=message)
            chained = _chain(conn, loaded, checked, run_id, text, failed, [])
            _drop_role(conn, role)
            return dataclasses.replace(failed, audit_chain_sha256=chained.chain_sha256)
        if stored.cached:
            _insert(conn, loaded, checked, run_id, text, columns, stored.rows, mode="dp", epsilon=0.0, answered_from=stored.release_id)
        result = AdHocResult(columns, stored.rows, made.get("groups", len(stored.rows)), mode="dp", epsilon=0.0 if stored.cached else stored.epsilon,
                             release_id=stored.release_id, cached=stored.cached, budget=stored.budget, release_audit={} if stored.cached else stored.audit)
        chained = _chain(conn, loaded, checked, run_id, text, result, [])
        _drop_role(conn, role)
    return dataclasses.replace(result, audit_chain_sha256=chained.chain_sha256)


def _ensure_results_table(conn: psycopg.Connection, loaded: LoadedCollaboration, runner: str) -> sql.Identifier:
    """The runner's own results table (its reader role sees only its own); columns fixed, the name follows the members."""
    c = loaded.name
    schema = naming.results_schema(c)
    table = sql.Identifier(schema, results_table(runner))
    reader = sql.Identifier(access.role_name(c, runner, "result_reader"))
    migrations.ensure(conn, "results", schema)
    conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-ad_hoc-ddl:{c}:{runner}",))
    conn.execute(
        sql.SQL(
            "create table if not exists {} (run_id text not null, ran_at timestamptz not null default now(), "
            "query_sha256 text not null, query text not null, columns jsonb not null, rows jsonb not null, "
            "suppressed integer not null default 0, suppressed_because jsonb not null default '[]')"
        ).format(table)
    )
    conn.execute(
        sql.SQL(
            "alter table {} add column if not exists mode text not null default 'exact', add column if not exists epsilon double precision not null default 0, "
            "add column if not exists release_id text, add column if not exists answered_from text, add column if not exists failure text"
        ).format(table)
    )
    conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(schema), reader))
    conn.execute(sql.SQL("grant select on {} to {}").format(table, reader))
    return table


def _insert(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, columns: list[str],
            rows: list[dict[str, Any]], *, mode: str, epsilon: float = 0.0, release_id: str | None = None, answered_from: str | None = None,
            suppressed: int = 0, reasons: list[str] | None = None, failure: str | None = None) -> None:
    table = _ensure_results_table(conn, loaded, checked.runner)
    conn.execute(
        sql.SQL("insert into {} (run_id, query_sha256, query, columns, rows, suppressed, suppressed_because, mode, epsilon, release_id, answered_from, failure) "
                "values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(table),
        (run_id, query_sha256(text), hashable(text), json.dumps(columns), json.dumps(rows), suppressed, json.dumps(reasons or []), mode, epsilon,
         release_id, answered_from, failure),
    )


def _store(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, result: AdHocResult,
           recorded: list[tuple[int, difference.People]]) -> audit.ChainRow:
    _insert(conn, loaded, checked, run_id, text, result.columns, result.rows, mode="exact", suppressed=result.suppressed, reasons=result.reasons,
            failure=result.failure)
    return _chain(conn, loaded, checked, run_id, text, result, recorded)


def _chain(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, result: AdHocResult,
           recorded: list[tuple[int, difference.People]]) -> audit.ChainRow:
    """The run's audit-chain entry: what was released (as stored), when (the daily cap's clock), and the people sets recorded."""
    c = loaded.name
    schema = naming.results_schema(c)
    stored = conn.execute(sql.SQL("select rows, ran_at from {} where run_id = %s").format(sql.Identifier(schema, results_table(checked.runner))),
                          (run_id,)).fetchone()
    assert stored is not None
    return audit_chain.append(conn, schema, c, "ad_hoc", run_id, {
        "run_id": run_id, "runner": checked.runner, "query_sha256": query_sha256(text), "datasets": list(checked.datasets),
        "mode": result.mode, "threshold": checked.min_distinct_units, "rows": len(result.rows), "rows_sha256": rows_digest(list(stored[0])),
        "suppressed": result.suppressed, "ran_at": audit.timestamp(stored[1]),
        "footprints_sha256": footprints.digest(recorded), "epsilon": result.epsilon, "release_id": result.release_id,
        **({"failure": result.failure} if result.failure else {}),
    })


def stored_result(conn: psycopg.Connection, collab: str, runner: str, run_id: str) -> AdHocResult:
    table = sql.Identifier(naming.results_schema(collab), results_table(runner))
    row = conn.execute(sql.SQL("select columns, rows, suppressed, suppressed_because, mode, epsilon, coalesce(release_id, answered_from), "
                               "answered_from is not null, failure from {} where run_id = %s").format(table), (run_id,)).fetchone()
    if row is None:
        raise LookupError(f"no stored result of run {run_id}")
    return AdHocResult(list(row[0]), list(row[1]), suppressed=int(row[2]), reasons=list(row[3]), mode=str(row[4]), epsilon=float(row[5]),
                       release_id=row[6], cached=bool(row[7]), failure=row[8])


def stored_rows(conn: psycopg.Connection, collab: str, runner: str, run_id: str) -> tuple[list[str], list[dict[str, object]]]:
    result = stored_result(conn, collab, runner, run_id)
    return result.columns, result.rows


__all__ = ["AdHocResult", "execute", "results_table", "stored_result", "stored_rows", "UNITS"]
