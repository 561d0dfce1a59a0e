"""Checks on a release, run right after it (under the same lock), shown as asset checks on its results asset.

Each is a second, independent look at a promise the release code makes:

- ``threshold_respected`` (threshold rule): every released group has at least
  ``min_distinct_units`` distinct people in the pre-noise table it came from;
- ``budget_respected`` (dp rule): the consumer's ledger, summed over its window,
  is within the policy's epsilon and delta;
- ``release_in_audit_chain``: the release has its entry in the audit chain, with the
  hash the release recorded, and the chain's links are intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..lib import audit, naming
from ..lib.policy import ApprovedQuery, LoadedCollaboration
from ..store import analysis as store_analysis
from ..store import audit_chain, ledger
from .release import REQUEST, THRESHOLD_UNITS, consumer_budget

THRESHOLD_CHECK, BUDGET_CHECK, CHAIN_CHECK = "threshold_respected", "budget_respected", "release_in_audit_chain"

DESCRIPTIONS = {
    THRESHOLD_CHECK: "Every released group has at least the policy's min_distinct_units distinct people (re-read from the pre-noise table).",
    BUDGET_CHECK: "The consumer's privacy budget is not exceeded: the ledger's epsilon and delta over the policy's window are within its budget.",
    CHAIN_CHECK: "The release has its entry in the tamper-evident audit chain with the hash the release recorded, and the chain's links are intact.",
}


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    detail: str
    metadata: dict[str, Any] = field(default_factory=dict)


def names_for(query: ApprovedQuery) -> list[str]:
    return [THRESHOLD_CHECK if query.spec.rule == "threshold" else BUDGET_CHECK, CHAIN_CHECK]


def check_release(conn: psycopg.Connection, loaded: LoadedCollaboration, query: ApprovedQuery, stored: ledger.StoredRelease,
                  request: str | None) -> list[CheckOutcome]:
    """The checks of ``names_for(query)`` for this release (``request``: what its pre-noise table was built for)."""
    out = [_threshold(conn, loaded, query, stored, request) if query.spec.rule == "threshold" else _budget(conn, loaded, query)]
    out.append(_chain(conn, loaded, stored))
    return out


def check_refusal(conn: psycopg.Connection, loaded: LoadedCollaboration, query: ApprovedQuery) -> list[CheckOutcome]:
    """The same checks after a refused request: nothing was released, the budget and the chain are still checked for real."""
    first = (CheckOutcome(THRESHOLD_CHECK, True, "request refused: nothing was released") if query.spec.rule == "threshold"
             else _budget(conn, loaded, query))
    problems = audit.verify_chain(audit_chain.chain(conn, naming.results_schema(loaded.name)))
    chain = (CheckOutcome(CHAIN_CHECK, False, f"the audit chain is broken: {problems[0]}", {"problems": len(problems)}) if problems
             else CheckOutcome(CHAIN_CHECK, True, "request refused: nothing was released; the chain's links are intact"))
    return [first, chain]


def _threshold(conn: psycopg.Connection, loaded: LoadedCollaboration, query: ApprovedQuery, stored: ledger.StoredRelease,
               request: str | None) -> CheckOutcome:
    spec, dims = query.spec, list(query.spec.dimensions)
    if stored.cached or request is None:
        return CheckOutcome(THRESHOLD_CHECK, True, "stored release returned again: it was checked when it was first released")
    table = sql.Identifier(naming.analysis_schema(loaded.name), f"query_{query.name}")
    rows = store_analysis.read_pre_noise(conn, loaded.name, sql.SQL("select {}, {} from {} where {} = %s").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(d)) for d in dims), sql.Identifier(THRESHOLD_UNITS), table,
        sql.Identifier(REQUEST)), (request,))
    units = {tuple(r[:-1]): int(r[-1]) for r in rows}
    released = {tuple(str(r[d]) for d in dims) for r in stored.rows}
    short = sorted(g for g in released if units.get(g, 0) < spec.min_distinct_units)
    smallest = min((units.get(g, 0) for g in released), default=None)
    meta = {"groups_released": len(released), "min_distinct_units": spec.min_distinct_units, "smallest_released_group": smallest}
    if short:
        return CheckOutcome(THRESHOLD_CHECK, False, f"{len(short)} released group(s) under {spec.min_distinct_units} people, e.g. {short[0]}", meta)
    return CheckOutcome(THRESHOLD_CHECK, True, f"{len(released)} group(s), the smallest with {smallest} people", meta)


def _budget(conn: psycopg.Connection, loaded: LoadedCollaboration, query: ApprovedQuery) -> CheckOutcome:
    budget = consumer_budget(loaded, query.spec.consumer)
    status = ledger.budget_status(conn, naming.results_schema(loaded.name), budget)
    meta = {"consumer": budget.consumer, "epsilon_spent": status.spent, "epsilon_budget": status.total,
            "delta_spent": status.delta_spent, "delta_budget": status.delta_total}
    tolerance = 1e-9
    if status.spent > status.total + tolerance or status.delta_spent > status.delta_total + tolerance:
        return CheckOutcome(BUDGET_CHECK, False, f"{budget.consumer} spent epsilon {status.spent:.6g} of {status.total:.6g} "
                            f"(delta {status.delta_spent:.3g} of {status.delta_total:.3g})", meta)
    return CheckOutcome(BUDGET_CHECK, True, f"{budget.consumer} spent epsilon {status.spent:.4g} of {status.total:.4g}", meta)


def _chain(conn: psycopg.Connection, loaded: LoadedCollaboration, stored: ledger.StoredRelease) -> CheckOutcome:
    schema = naming.results_schema(loaded.name)
    row = audit_chain.find(conn, schema, "release", stored.release_id)
    if row is None:
        return CheckOutcome(CHAIN_CHECK, False, f"release {stored.release_id} has no entry in the audit chain")
    recorded = stored.audit.get("entry_sha256")
    if recorded and recorded != row.entry_sha256:
        return CheckOutcome(CHAIN_CHECK, False, f"the chain's entry for {stored.release_id} differs from the one the release recorded")
    problems = audit.verify_chain(audit_chain.chain(conn, schema))
    if problems:
        return CheckOutcome(CHAIN_CHECK, False, f"the audit chain is broken: {problems[0]}", {"problems": len(problems)})
    return CheckOutcome(CHAIN_CHECK, True, f"entry {row.seq} of the chain", {"audit_seq": row.seq, "audit_entry_sha256": row.entry_sha256})
