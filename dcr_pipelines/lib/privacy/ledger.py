"""Where the budget is charged: a ledger in PostgreSQL, written in the release's own transaction.

``release()`` takes a per-(collaboration, consumer) advisory lock, returns
the stored result if an identical release exists (no fresh noise to average
away), refuses a release the remaining budget cannot cover, and otherwise
draws the noise, stores the result and the ledger row, and commits them
together: a release never exists without its charge, nor a charge without
its release.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..policy.models import Budget


class BudgetExhausted(Exception):
    """The consumer's remaining budget cannot cover the release."""


@dataclass(frozen=True)
class BudgetStatus:
    consumer: str
    total: float
    spent: float
    period_days: int | None
    refreshes_at: dt.datetime | None

    @property
    def remaining(self) -> float:
        return max(0.0, self.total - self.spent)


@dataclass(frozen=True)
class StoredRelease:
    release_id: str
    cached: bool
    epsilon: float
    rows: list[dict[str, Any]]
    budget: BudgetStatus


def ensure_tables(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            """
            create table if not exists {ledger} (
                entry_id bigserial primary key,
                consumer text not null,
                query_name text not null,
                release_id text not null,
                epsilon double precision not null check (epsilon >= 0),
                delta double precision not null default 0 check (delta >= 0),
                charged_at timestamptz not null default now()
            );
            create table if not exists {releases} (
                release_id text primary key,
                cache_key text not null unique,
                query_name text not null,
                consumer text not null,
                params jsonb not null,
                input_versions jsonb not null,
                epsilon double precision not null,
                rows jsonb not null,
                released_at timestamptz not null default now()
            )
            """
        ).format(ledger=sql.Identifier(schema, "budget_ledger"), releases=sql.Identifier(schema, "releases"))
    )


def cache_key(query_sha256: str, params: dict[str, str], input_versions: dict[str, Any]) -> str:
    """Identity of a release: same query text, parameters and input data versions."""
    payload = json.dumps({"q": query_sha256, "p": params, "v": input_versions}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def budget_status(conn: psycopg.Connection, schema: str, budget: Budget, now: dt.datetime | None = None) -> BudgetStatus:
    now = now or conn.execute("select now()").fetchone()[0]  # type: ignore[index]
    ledger = sql.Identifier(schema, "budget_ledger")
    if budget.period_days is None:
        row = conn.execute(
            sql.SQL("select coalesce(sum(epsilon), 0), null from {} where consumer = %s").format(ledger),
            (budget.consumer,),
        ).fetchone()
        return BudgetStatus(budget.consumer, budget.epsilon, float(row[0]), None, None)  # type: ignore[index]
    start = now - dt.timedelta(days=budget.period_days)
    row = conn.execute(
        sql.SQL("select coalesce(sum(epsilon), 0), min(charged_at) from {} where consumer = %s and charged_at > %s").format(ledger),
        (budget.consumer, start),
    ).fetchone()
    oldest = row[1]  # type: ignore[index]
    refreshes = oldest + dt.timedelta(days=budget.period_days) if oldest is not None else None
    return BudgetStatus(budget.consumer, budget.epsilon, float(row[0]), budget.period_days, refreshes)  # type: ignore[index]


def release(
    conn: psycopg.Connection,
    schema: str,
    *,
    collaboration: str,
    query_name: str,
    budget: Budget,
    key: str,
    params: dict[str, str],
    input_versions: dict[str, Any],
    cost: float,
    draw: Callable[[], list[dict[str, Any]]],
    store_rows: Callable[[psycopg.Connection, str, list[dict[str, Any]]], None],
) -> StoredRelease:
    """Charge ``cost`` and store ``draw()``'s noised rows atomically, or return the identical earlier release."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-budget:{collaboration}:{budget.consumer}",))
        stored = conn.execute(
            sql.SQL("select release_id, epsilon, rows from {} where cache_key = %s").format(sql.Identifier(schema, "releases")),
            (key,),
        ).fetchone()
        if stored is not None:
            status = budget_status(conn, schema, budget)
            return StoredRelease(stored[0], True, float(stored[1]), list(stored[2]), status)
        status = budget_status(conn, schema, budget)
        if cost > status.remaining + 1e-12:
            when = f"; it refreshes at {status.refreshes_at:%Y-%m-%d %H:%M} UTC" if status.refreshes_at else " and does not refresh"
            raise BudgetExhausted(
                f"privacy budget of {budget.consumer} in {collaboration} cannot cover query {query_name}: "
                f"cost epsilon {cost:.4g}, remaining {status.remaining:.4g} of {status.total:.4g}{when}"
            )
        release_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        rows = draw()
        conn.execute(
            sql.SQL(
                "insert into {} (release_id, cache_key, query_name, consumer, params, input_versions, epsilon, rows) "
                "values (%s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(sql.Identifier(schema, "releases")),
            (release_id, key, query_name, budget.consumer, json.dumps(params), json.dumps(input_versions), cost, json.dumps(rows)),
        )
        conn.execute(
            sql.SQL("insert into {} (consumer, query_name, release_id, epsilon) values (%s, %s, %s, %s)").format(
                sql.Identifier(schema, "budget_ledger")
            ),
            (budget.consumer, query_name, release_id, cost),
        )
        store_rows(conn, release_id, rows)
        status = budget_status(conn, schema, budget)
    return StoredRelease(release_id, False, cost, rows, status)
