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
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..lib import audit
from ..lib.policy.models import Budget
from . import audit_chain, migrations

log = logging.getLogger(__name__)


class BudgetExhausted(Exception):
    """The consumer's remaining budget cannot cover the release."""


class ReleaseFailed(Exception):
    """A release failed; the message is generic (for the analyst), the operator's log has the details."""


@dataclass(frozen=True)
class BudgetStatus:
    consumer: str
    total: float
    spent: float
    period_days: int | None
    refreshes_at: dt.datetime | None
    delta_total: float = 0.0
    delta_spent: float = 0.0

    @property
    def remaining(self) -> float:
        return max(0.0, self.total - self.spent)

    @property
    def delta_remaining(self) -> float:
        return max(0.0, self.delta_total - self.delta_spent)


@dataclass(frozen=True)
class StoredRelease:
    release_id: str
    cached: bool
    epsilon: float
    rows: list[dict[str, Any]]
    budget: BudgetStatus
    audit: dict[str, Any] = field(default_factory=dict)
    withheld: tuple[str, ...] = ()  # groups withheld by the difference check, and why (threshold releases)
    withheld_rows: int = 0  # how many groups above the threshold that withholding kept back (threshold releases)


def _audit(row: audit.ChainRow | None, head: audit.Anchor | None = None) -> dict[str, Any]:
    """A release's chain entry as its Dagster event mirrors it, and the head its exports carry."""
    if row is None:
        return {}
    out: dict[str, Any] = {"entry": row.entry, "entry_sha256": row.entry_sha256, "chain_sha256": row.chain_sha256, "seq": row.seq}
    if head is not None:
        out["head"] = {"collaboration": head.collaboration, "seq": head.seq, "chain_sha256": head.chain_sha256}
    return out


def ensure_tables(conn: psycopg.Connection, schema: str) -> None:
    """The ledger, releases and audit-chain tables of a results schema (store/migrations/results)."""
    migrations.ensure(conn, "results", schema)


def cache_key(query_sha256: str, params: dict[str, str], input_versions: dict[str, Any]) -> str:
    """Identity of a release: same query text, parameters and input data versions."""
    payload = json.dumps({"q": query_sha256, "p": params, "v": input_versions}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def stored_release_id(conn: psycopg.Connection, schema: str, key: str) -> str | None:
    """The release already made for this cache key, if any (its request needs no new pre-noise table)."""
    if conn.execute("select to_regclass(%s)", (f"{schema}.releases",)).fetchone()[0] is None:  # type: ignore[index]
        return None
    row = conn.execute(sql.SQL("select release_id from {} where cache_key = %s").format(sql.Identifier(schema, "releases")), (key,)).fetchone()
    return str(row[0]) if row else None


def budget_status(conn: psycopg.Connection, schema: str, budget: Budget, now: dt.datetime | None = None) -> BudgetStatus:
    ensure_tables(conn, schema)
    now = now or conn.execute("select now()").fetchone()[0]  # type: ignore[index]
    ledger = sql.Identifier(schema, "budget_ledger")
    start = now - dt.timedelta(days=budget.period_days) if budget.period_days else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    row = conn.execute(
        sql.SQL("select coalesce(sum(epsilon), 0), coalesce(sum(delta), 0), min(charged_at) from {} where consumer = %s and charged_at > %s").format(ledger),
        (budget.consumer, start),
    ).fetchone()
    spent, delta_spent, oldest = float(row[0]), float(row[1]), row[2]  # type: ignore[index]
    refreshes = oldest + dt.timedelta(days=budget.period_days) if budget.period_days and oldest is not None else None
    return BudgetStatus(budget.consumer, budget.epsilon, spent, budget.period_days, refreshes, budget.delta, delta_spent)


def charge_release(
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
    delta: float = 0.0,
    receivers: Sequence[str] = (),
    query_sha256: str = "",
    run_id: str | None = None,
    chained_with: Callable[[], dict[str, Any]] | None = None,
    requested_by: str | None = None,
) -> StoredRelease:
    """Charge ``(cost, delta)`` and store ``draw()``'s noised rows atomically, or return the identical earlier release.

    ``chained_with`` adds fields to the release's audit-chain entry once its rows are stored (a threshold
    release: the digest of the people sets it recorded).

    If anything fails once noise has been drawn, the release is rolled back
    but the charge is still recorded (an error can depend on a noisy value),
    and ``ReleaseFailed`` carries only a generic message and a reference.
    """
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-budget:{collaboration}:{budget.consumer}",))
        stored = conn.execute(
            sql.SQL("select rows, release_id, epsilon from {} where cache_key = %s").format(sql.Identifier(schema, "releases")),
            (key,),
        ).fetchone()
        if stored is not None:
            status = budget_status(conn, schema, budget)
            chained = audit_chain.find(conn, schema, "release", stored[1])
            return StoredRelease(stored[1], True, float(stored[2]), list(stored[0]), status, _audit(chained, audit_chain.head(conn, schema, collaboration)))
        status = budget_status(conn, schema, budget)
        when = f"; it refreshes at {status.refreshes_at:%Y-%m-%d %H:%M} UTC" if status.refreshes_at else " and does not refresh"
        if cost > status.remaining + 1e-12:
            raise BudgetExhausted(
                f"privacy budget of {budget.consumer} in {collaboration} cannot cover query {query_name}: "
                f"cost epsilon {cost:.4g}, remaining {status.remaining:.4g} of {status.total:.4g}{when}"
            )
        if delta > status.delta_remaining + 1e-18:
            raise BudgetExhausted(
                f"privacy budget of {budget.consumer} in {collaboration} cannot cover query {query_name}: "
                f"cost delta {delta:.3g}, remaining delta {status.delta_remaining:.3g} of {status.delta_total:.3g}{when}"
            )
        release_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        charge = sql.SQL("insert into {} (consumer, query_name, release_id, epsilon, delta) values (%s, %s, %s, %s, %s) returning "
                         + audit_chain.LEDGER_COLUMNS).format(sql.Identifier(schema, "budget_ledger"))
        try:
            with conn.transaction():  # a savepoint: a failure undoes the release, not the lock
                rows = draw()
                released_at = audit.timestamp(dt.datetime.now(dt.UTC))
                conn.execute(
                    sql.SQL(
                        "insert into {} (release_id, cache_key, query_name, consumer, params, input_versions, epsilon, rows, delta, receivers, "
                        "query_sha256, released_at) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(sql.Identifier(schema, "releases")),
                    (release_id, key, query_name, budget.consumer, json.dumps(params), json.dumps(input_versions), cost, json.dumps(rows),
                     delta, json.dumps(list(receivers)), query_sha256, released_at),
                )
                charged = conn.execute(charge, (budget.consumer, query_name, release_id, cost, delta)).fetchone()
                store_rows(conn, release_id, rows)
                # The audit chain, in this transaction: the rows as stored in both tables, and the charge.
                entry = {
                    "release_id": release_id, "query_name": query_name, "consumer": budget.consumer, "receivers": list(receivers),
                    "query_sha256": query_sha256, "params": params, "input_versions": input_versions, "epsilon": cost, "delta": delta,
                    "rows_sha256": audit_chain.stored_rows_digest(conn, schema, release_id),
                    "results_sha256": audit_chain.results_digest(conn, schema, query_name, release_id),
                    "released_at": released_at, "run_id": run_id,
                    **({"requested_by": requested_by} if requested_by else {}),
                    **(chained_with() if chained_with is not None else {}),
                }
                chained = audit_chain.append(conn, schema, collaboration, "release", release_id, entry)
                assert charged is not None
                audit_chain.append(conn, schema, collaboration, "charge", str(charged[0]), audit_chain.charge_entry(tuple(charged)))
                conn.execute(
                    sql.SQL("update {} set rows_sha256 = %s, entry_sha256 = %s, prev_sha256 = %s, chain_sha256 = %s where release_id = %s").format(
                        sql.Identifier(schema, "releases")),
                    (entry["rows_sha256"], chained.entry_sha256, chained.prev_sha256, chained.chain_sha256, release_id),
                )
        except Exception:
            log.exception("release %s of %s/%s failed after noise was drawn; charging epsilon %s", release_id, collaboration, query_name, cost)
            charged = conn.execute(charge, (budget.consumer, query_name, f"failed:{release_id}", cost, delta)).fetchone()
            assert charged is not None
            audit_chain.append(conn, schema, collaboration, "charge", str(charged[0]), audit_chain.charge_entry(tuple(charged)))
            failed = True
        else:
            failed = False
        status = budget_status(conn, schema, budget)
        head = audit_chain.head(conn, schema, collaboration)
    if failed:
        raise ReleaseFailed(
            f"the release of {query_name} failed and was charged epsilon {cost:.4g}, because noise had been drawn; "
            f"the operator's log has the details (reference {release_id})"
        )
    return StoredRelease(release_id, False, cost, rows, status, _audit(chained, head))
