"""The budget report: each consumer's budget, what it has spent, how many more releases fit, who spends on each owner's data."""

from __future__ import annotations

from typing import Any

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..lib.privacy.mechanisms import plan_key_selection, plan_release, release_cost
from ..store import Connection, ledger, results


def report(conn: Connection, loaded: LoadedCollaboration, consumer: str | None = None) -> dict[str, Any]:
    """{"consumers": [...], "owners": {owner: [...]}} for every budget (or one consumer's); plain JSON values."""
    schema = naming.results_schema(loaded.name)
    budgets = [b for b in loaded.collaboration.budgets if consumer in (None, b.consumer)]
    costs = {q.name: release_cost(plan_release(q.spec), plan_key_selection(q.spec)) for q in loaded.queries.values() if q.spec.rule == "dp"}
    out: dict[str, Any] = {"consumers": [], "owners": {}}
    for b in budgets:
        s = ledger.budget_status(conn, schema, b)
        fits = {
            q: int((s.remaining + 1e-12) // eps) if eps else None
            for q, (eps, delta) in costs.items()
            if loaded.queries[q].spec.consumer == b.consumer and (delta == 0 or delta <= s.delta_remaining)
        }
        out["consumers"].append({
            "consumer": b.consumer, "epsilon": s.total, "spent": s.spent, "remaining": s.remaining,
            "delta": s.delta_total, "delta_spent": s.delta_spent, "period_days": s.period_days,
            "refreshes_at": s.refreshes_at.isoformat() if s.refreshes_at else None, "releases_that_fit": fits,
        })
    owners_of = {q.name: sorted({loaded.collaboration.datasets[d].owner for d in q.datasets}) for q in loaded.queries.values()}
    for who, query_name, count, total in results.spending(conn, loaded.name):
        for owner in owners_of.get(query_name, []):
            out["owners"].setdefault(owner, []).append({"consumer": who, "query": query_name, "releases": count, "epsilon": total})
    return out
