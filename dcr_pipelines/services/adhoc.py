"""Running a checked ad-hoc query: least privilege, two phases, difference checks, results for the runner only.

One transaction per run:

1. a role that exists only inside this transaction and may read only the
   matched views of the datasets the query names (never tokens, the
   cross-reference, pre-noise tables or other results);
2. phase 1 as that role: the groups that pass the threshold, with their
   plain aggregates and people sets (``checker`` guarantees it cannot fail on
   any data);
3. the difference check against every row released to any runner in the
   retention window, under the collaboration's lock;
4. phase 2 as that role over the surviving groups only: the analyst's own
   arithmetic, HAVING, ORDER BY and LIMIT;
5. the released rows' people sets and the result are stored, the role is
   dropped, and everything commits together.

Database errors reach the analyst as one generic line with the SQLSTATE
only: the message text could quote a value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..lib import audit, naming
from ..lib.adhoc.checker import PEOPLE, UNITS, CheckedQuery, QueryRefused, hashable, query_sha256
from ..lib.audit import rows_digest
from ..lib.policy import LoadedCollaboration
from ..lib.privacy import difference
from ..store import access, audit_chain, footprints, migrations


@dataclass(frozen=True)
class AdHocResult:
    columns: list[str]
    rows: list[dict[str, Any]]
    groups: int = 0  # groups that passed the threshold
    suppressed: int = 0  # of those, withheld by the difference check
    reasons: list[str] = field(default_factory=list)
    audit_chain_sha256: str = ""


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


def _type_names(conn: psycopg.Connection, oids: list[int]) -> list[str]:
    names: dict[int, str] = dict(conn.execute("select o, format_type(o, null) from unnest(%s::oid[]) as o", (oids,)).fetchall())
    return [str(names[o]) for o in oids]


def _runs_today(conn: psycopg.Connection, collab: str, runner: str) -> int:
    table = f"{naming.results_schema(collab)}.{results_table(runner)}"
    if conn.execute("select to_regclass(%s)", (table,)).fetchone()[0] is None:  # type: ignore[index]
        return 0
    row = conn.execute(
        sql.SQL("select count(*) from {} where ran_at > now() - interval '1 day'").format(sql.Identifier(naming.results_schema(collab), results_table(runner)))
    ).fetchone()
    return int(row[0]) if row else 0


def execute(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, timeout_s: int = 120) -> AdHocResult:
    """Run a checked query (see the module docstring); store its rows for the runner only; return them."""
    c = loaded.name
    checks = loaded.collaboration.difference_checks
    cap = loaded.collaboration.ad_hoc.max_queries_per_day
    with conn.transaction():
        footprints.lock(conn, c)
        if cap is not None and _runs_today(conn, c, checked.runner) >= cap:
            raise QueryRefused("ad_hoc.max_queries_per_day", f"{checked.runner} has run {cap} ad-hoc queries in the last 24 hours, the most the policy allows")
        role = _temporary_role(conn, loaded, checked)
        cursor = _as_role(conn, role, timeout_s, checked.phase1 if checks.enabled else checked.phase1_without_people)
        description = list(cursor.description or ())
        groups = cursor.fetchall()
        width = checked.keys + checked.aggregates
        if checks.enabled:
            people_at = [d.name for d in description].index(PEOPLE)
            sets = [difference.people(row[people_at] or []) for row in groups]
            verdicts = footprints.check(conn, c, sets, checked.min_distinct_units, checks.retention_days, source="ad_hoc", source_id=run_id)
            kept = [v.row for v in verdicts if v.released]
            reasons = sorted({footprints.describe(v.withheld_because, checked.min_distinct_units) for v in verdicts if v.withheld_because is not None})
        else:
            sets, kept, reasons = [], list(range(len(groups))), []
        types = ["bigint", *_type_names(conn, [d.type_code for d in description[:width]])]
        arrays = [kept] + [[groups[i][col] for i in kept] for col in range(width)]
        output = _as_role(conn, role, timeout_s, checked.phase2(types), arrays)
        names = [d.name for d in output.description or ()][:-1]
        released = output.fetchall()
        rows = [dict(zip(names, (_plain_value(v) for v in row[:-1]), strict=False)) for row in released]
        if checks.enabled:
            footprints.record(conn, c, "ad_hoc", run_id, [(int(row[-1]), sets[int(row[-1])]) for row in released], checks.retention_days)
        result = AdHocResult(list(checked.columns), rows, len(groups), len(groups) - len(kept), reasons)
        chained = _store(conn, loaded, checked, run_id, text, result)
        result = dataclasses.replace(result, audit_chain_sha256=chained.chain_sha256)
        _drop_role(conn, role)
    return result


def _store(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, result: AdHocResult) -> audit.ChainRow:
    c = loaded.name
    schema = naming.results_schema(c)
    table = sql.Identifier(schema, results_table(checked.runner))
    reader = sql.Identifier(access.role_name(c, checked.runner, "result_reader"))
    migrations.ensure(conn, "results", schema)
    # One table per runner (its reader role sees only its own); the columns are fixed, the name follows the policy's members.
    conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-adhoc-ddl:{c}:{checked.runner}",))
    conn.execute(
        sql.SQL(
            "create table if not exists {} (run_id text not null, ran_at timestamptz not null default now(), "
            "query_sha256 text not null, query text not null, columns jsonb not null, rows jsonb not null, "
            "suppressed integer not null default 0, suppressed_because jsonb not null default '[]')"
        ).format(table)
    )
    conn.execute(
        sql.SQL("insert into {} (run_id, query_sha256, query, columns, rows, suppressed, suppressed_because) values (%s, %s, %s, %s, %s, %s, %s)").format(table),
        (run_id, query_sha256(text), hashable(text), json.dumps(result.columns), json.dumps(result.rows), result.suppressed, json.dumps(result.reasons)),
    )
    conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(schema), reader))
    conn.execute(sql.SQL("grant select on {} to {}").format(table, reader))
    stored = conn.execute(sql.SQL("select rows from {} where run_id = %s").format(table), (run_id,)).fetchone()
    return audit_chain.append(conn, schema, c, "ad_hoc", run_id, {
        "run_id": run_id, "runner": checked.runner, "query_sha256": query_sha256(text), "datasets": list(checked.datasets),
        "threshold": checked.min_distinct_units, "rows": len(result.rows), "rows_sha256": rows_digest(list(stored[0]) if stored else []),
        "suppressed": result.suppressed,
    })


def stored_result(conn: psycopg.Connection, collab: str, runner: str, run_id: str) -> AdHocResult:
    table = sql.Identifier(naming.results_schema(collab), results_table(runner))
    row = conn.execute(sql.SQL("select columns, rows, suppressed, suppressed_because from {} where run_id = %s").format(table), (run_id,)).fetchone()
    if row is None:
        raise LookupError(f"no stored result of run {run_id}")
    return AdHocResult(list(row[0]), list(row[1]), suppressed=int(row[2]), reasons=list(row[3]))


def stored_rows(conn: psycopg.Connection, collab: str, runner: str, run_id: str) -> tuple[list[str], list[dict[str, object]]]:
    result = stored_result(conn, collab, runner, run_id)
    return result.columns, result.rows


__all__ = ["AdHocResult", "execute", "results_table", "stored_result", "stored_rows", "UNITS"]
