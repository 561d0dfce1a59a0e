"""Reading a collaboration's results schema: stored releases, the overlap, spending per query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..lib import naming
from ..store import access
from . import migrations


@dataclass(frozen=True)
class StoredRelease:
    release_id: str
    rows: list[dict[str, Any]]
    epsilon: float
    params: dict[str, str]
    released_at: datetime


@dataclass(frozen=True)
class OverlapRelease:
    release_id: str
    matched_people: float
    ci_low: float | None
    ci_high: float | None


def _schema(conn: psycopg.Connection, collab: str) -> str:
    schema = naming.results_schema(collab)
    migrations.ensure(conn, "results", schema)
    return schema


def latest_release(conn: psycopg.Connection, collab: str, query_name: str, release_id: str | None = None) -> StoredRelease | None:
    """The newest release of a query (or the named one)."""
    schema = _schema(conn, collab)
    row = conn.execute(
        sql.SQL("select release_id, rows, epsilon, params, released_at from {} where query_name = %s "
                + ("and release_id = %s " if release_id else "")
                + "order by released_at desc limit 1").format(sql.Identifier(schema, "releases")),
        (query_name, release_id) if release_id else (query_name,),
    ).fetchone()
    if row is None:
        return None
    return StoredRelease(str(row[0]), list(row[1]), float(row[2]), dict(row[3]), row[4])


def recent_releases(conn: psycopg.Connection, collab: str, query_name: str, limit: int = 10) -> list[StoredRelease]:
    """A query's releases, newest first."""
    schema = _schema(conn, collab)
    rows = conn.execute(
        sql.SQL("select release_id, rows, epsilon, params, released_at from {} where query_name = %s order by released_at desc limit %s").format(
            sql.Identifier(schema, "releases")),
        (query_name, limit),
    ).fetchall()
    return [StoredRelease(str(r[0]), list(r[1]), float(r[2]), dict(r[3]), r[4]) for r in rows]


def release_rows(conn: psycopg.Connection, collab: str, release_id: str) -> list[dict[str, Any]]:
    schema = _schema(conn, collab)
    row = conn.execute(sql.SQL("select rows from {} where release_id = %s").format(sql.Identifier(schema, "releases")), (release_id,)).fetchone()
    return list(row[0]) if row else []


def spending(conn: psycopg.Connection, collab: str) -> list[tuple[str, str, int, float]]:
    """(consumer, query, releases charged, epsilon spent) from the budget ledger."""
    schema = _schema(conn, collab)
    rows = conn.execute(
        sql.SQL("select consumer, query_name, count(*), sum(epsilon) from {} group by 1, 2 order by 1, 2").format(sql.Identifier(schema, "budget_ledger"))
    ).fetchall()
    return [(str(c), str(q), int(n), float(e)) for c, q, n, e in rows]


def overlap_releases(conn: psycopg.Connection, collab: str) -> list[OverlapRelease]:
    schema = _schema(conn, collab)
    rows = conn.execute(
        sql.SQL("select release_id, value, ci_low, ci_high from {} order by release_id").format(sql.Identifier(schema, access.OVERLAP))
    ).fetchall()
    return [OverlapRelease(str(r[0]), float(r[1]), r[2], r[3]) for r in rows]
