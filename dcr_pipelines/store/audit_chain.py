"""Where the audit chain lives: ``<collab>_results.audit_chain``, appended in the transaction of what it records.

See ``audit`` for what an entry holds and how it is verified. This module
writes entries, reads the chain and its head, and reads back the tables
users read (releases, results, budget ledger, ad-hoc results) as evidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from ..lib.audit import GENESIS, Anchor, ChainRow, Evidence, canonical, entry_digest, link, rows_digest, timestamp
from . import migrations

TABLE = "audit_chain"


def ensure(conn: psycopg.Connection, schema: str) -> None:
    migrations.ensure(conn, "results", schema)


def _exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return conn.execute("select to_regclass(%s)", (f'"{schema}"."{table}"',)).fetchone()[0] is not None  # type: ignore[index]


def append(conn: psycopg.Connection, schema: str, collaboration: str, kind: str, ref: str, entry: Mapping[str, Any]) -> ChainRow:
    """Chain ``entry`` after the current head (call inside the transaction that makes what it records)."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-audit:{collaboration}",))
        ensure(conn, schema)
        normal = json.loads(canonical(dict(entry)))  # exactly what jsonb gives back
        last = conn.execute(sql.SQL("select chain_sha256 from {} order by seq desc limit 1").format(sql.Identifier(schema, TABLE))).fetchone()
        previous = last[0] if last else GENESIS
        digest = entry_digest(normal)
        chained = link(previous, digest)
        seq = conn.execute(
            sql.SQL("insert into {} (kind, ref, entry, entry_sha256, prev_sha256, chain_sha256) values (%s, %s, %s, %s, %s, %s) returning seq").format(
                sql.Identifier(schema, TABLE)
            ),
            (kind, ref, json.dumps(normal), digest, previous, chained),
        ).fetchone()[0]  # type: ignore[index]
    return ChainRow(int(seq), kind, ref, normal, digest, previous, chained)


def chain(conn: psycopg.Connection, schema: str) -> list[ChainRow]:
    if not _exists(conn, schema, TABLE):
        return []
    rows = conn.execute(
        sql.SQL("select seq, kind, ref, entry, entry_sha256, prev_sha256, chain_sha256 from {} order by seq").format(sql.Identifier(schema, TABLE))
    ).fetchall()
    return [ChainRow(int(r[0]), r[1], r[2], dict(r[3]), r[4], r[5], r[6]) for r in rows]


def find(conn: psycopg.Connection, schema: str, kind: str, ref: str) -> ChainRow | None:
    if not _exists(conn, schema, TABLE):
        return None
    r = conn.execute(
        sql.SQL("select seq, kind, ref, entry, entry_sha256, prev_sha256, chain_sha256 from {} where kind = %s and ref = %s order by seq limit 1").format(
            sql.Identifier(schema, TABLE)
        ),
        (kind, ref),
    ).fetchone()
    return ChainRow(int(r[0]), r[1], r[2], dict(r[3]), r[4], r[5], r[6]) if r else None


def head(conn: psycopg.Connection, schema: str, collaboration: str) -> Anchor | None:
    """The newest entry: what every export carries and a party may save."""
    if not _exists(conn, schema, TABLE):
        return None
    r = conn.execute(sql.SQL("select seq, chain_sha256 from {} order by seq desc limit 1").format(sql.Identifier(schema, TABLE))).fetchone()
    return Anchor(collaboration, int(r[0]), r[1]) if r else None


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return timestamp(value) if hasattr(value, "tzinfo") and getattr(value, "tzinfo", None) is not None else value.isoformat()
    return value


def results_digest(conn: psycopg.Connection, schema: str, table: str, release_id: str) -> str:
    """SHA-256 of a release's rows in the results table members read, as stored now."""
    if not _exists(conn, schema, table):
        return rows_digest([])
    cursor = conn.execute(sql.SQL("select * from {} where release_id = %s").format(sql.Identifier(schema, table)), (release_id,))
    names = [d.name for d in cursor.description or ()]
    return rows_digest([{n: _plain(v) for n, v in zip(names, row, strict=False)} for row in cursor.fetchall()])


def stored_rows_digest(conn: psycopg.Connection, schema: str, release_id: str) -> str:
    row = conn.execute(sql.SQL("select rows from {} where release_id = %s").format(sql.Identifier(schema, "releases")), (release_id,)).fetchone()
    return rows_digest(list(row[0]) if row else [])


def charge_entry(row: tuple[Any, ...]) -> dict[str, Any]:
    """A ledger row as chained: (entry_id, consumer, query_name, release_id, epsilon, delta, charged_at)."""
    entry_id, consumer, query_name, release_id, epsilon, delta, charged_at = row
    return {"entry_id": str(entry_id), "consumer": consumer, "query_name": query_name, "release_id": release_id,
            "epsilon": float(epsilon), "delta": float(delta), "charged_at": timestamp(charged_at)}


LEDGER_COLUMNS = "entry_id, consumer, query_name, release_id, epsilon, delta, charged_at"


def evidence(conn: psycopg.Connection, schema: str) -> Evidence:
    """What the releases, results, ledger and ad-hoc tables hold now, digested as the chain recorded them."""
    out = Evidence()
    if _exists(conn, schema, "releases"):
        for r in conn.execute(
            sql.SQL("select release_id, query_name, consumer, receivers, query_sha256, params, input_versions, epsilon, delta, rows from {}").format(
                sql.Identifier(schema, "releases")
            )
        ).fetchall():
            rid = r[0]
            out.releases[rid] = {
                "release_id": rid, "query_name": r[1], "consumer": r[2], "receivers": list(r[3] or []), "query_sha256": r[4],
                "params": r[5], "input_versions": r[6], "epsilon": float(r[7]), "delta": float(r[8]),
                "rows_sha256": rows_digest(list(r[9])), "results_sha256": results_digest(conn, schema, r[1], rid),
            }
    if _exists(conn, schema, "budget_ledger"):
        for r in conn.execute(sql.SQL("select " + LEDGER_COLUMNS + " from {}").format(sql.Identifier(schema, "budget_ledger"))).fetchall():
            entry = charge_entry(tuple(r))
            out.charges[entry["entry_id"]] = entry
    tables = conn.execute("select tablename from pg_tables where schemaname = %s and tablename like 'ad\\_hoc\\_\\_%%'", (schema,)).fetchall()
    for (table,) in tables:
        runner = table.removeprefix("ad_hoc__")
        for r in conn.execute(sql.SQL("select run_id, query_sha256, rows, suppressed, ran_at from {}").format(sql.Identifier(schema, table))).fetchall():
            out.ad_hoc[r[0]] = {"run_id": r[0], "runner": runner, "query_sha256": r[1], "rows": len(r[2]), "rows_sha256": rows_digest(list(r[2])),
                                "suppressed": int(r[3]), "ran_at": timestamp(r[4])}
    return out


def record_policy(conn: psycopg.Connection, schema: str, collaboration: str, policy_sha256: str, queries: Mapping[str, str]) -> ChainRow | None:
    """Chain the policy version being applied, unless it is the last one chained; return its entry."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-audit:{collaboration}",))
        ensure(conn, schema)
        last = conn.execute(
            sql.SQL("select entry->>'policy_sha256' from {} where kind = 'policy' order by seq desc limit 1").format(sql.Identifier(schema, TABLE))
        ).fetchone()
        if last and last[0] == policy_sha256:
            row = conn.execute(
                sql.SQL("select seq, kind, ref, entry, entry_sha256, prev_sha256, chain_sha256 from {} where kind = 'policy' order by seq desc limit 1").format(
                    sql.Identifier(schema, TABLE))
            ).fetchone()
            return ChainRow(int(row[0]), row[1], row[2], dict(row[3]), row[4], row[5], row[6]) if row else None
        return append(conn, schema, collaboration, "policy", policy_sha256[:16], {"policy_sha256": policy_sha256, "queries": dict(queries)})
