"""The budget report: each consumer's budget, what it has spent, how many more releases fit, who spends on each owner's data."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from ..lib import naming
from ..lib.policy import ApprovedQuery, LoadedCollaboration
from ..lib.privacy.mechanisms import KeySelectionPlan, NoisePlan, plan_key_selection, plan_release, release_cost
from ..store import Connection, ledger, results
from .release import consumer_budget


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
    noised = sorted({ds.owner for ds in loaded.collaboration.datasets.values() if ds.analysis_rule.type == "differential_privacy"})
    for member in loaded.collaboration.members:  # DP ad-hoc SQL is charged as ad_hoc__<runner>: it spends on the owners of noised datasets
        owners_of[f"ad_hoc__{member}"] = noised
    for who, query_name, count, total in results.spending(conn, loaded.name):
        for owner in owners_of.get(query_name, []):
            out["owners"].setdefault(owner, []).append({"consumer": who, "query": query_name, "releases": count, "epsilon": total})
    return out


@dataclass(frozen=True)
class DryRun:
    """What a DP release of one query would cost, against what its consumer has left now."""

    plans: list[NoisePlan]
    selection: KeySelectionPlan | None
    epsilon: float
    delta: float
    status: ledger.BudgetStatus

    @property
    def fits(self) -> bool:
        """The same test the release itself makes (store/ledger.charge_release), before it draws any noise."""
        return self.epsilon <= self.status.remaining + 1e-12 and (self.delta == 0 or self.delta <= self.status.delta_remaining + 1e-18)

    @property
    def remaining_after(self) -> float:
        return max(0.0, self.status.remaining - self.epsilon)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (a member's dry run is answered in its request row, and printed by its own client)."""
        status = asdict(self.status)
        status["refreshes_at"] = self.status.refreshes_at.isoformat() if self.status.refreshes_at else None
        return {"plans": [asdict(p) for p in self.plans], "selection": asdict(self.selection) if self.selection else None,
                "epsilon": self.epsilon, "delta": self.delta, "status": status}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DryRun:
        status = dict(data["status"])
        status["refreshes_at"] = dt.datetime.fromisoformat(status["refreshes_at"]) if status.get("refreshes_at") else None
        return cls([NoisePlan(**p) for p in data["plans"]], KeySelectionPlan(**data["selection"]) if data.get("selection") else None,
                   float(data["epsilon"]), float(data["delta"]), ledger.BudgetStatus(**status))


def averages(query: ApprovedQuery) -> list[str]:
    """The metrics of ``query`` released as a noisy sum over a noisy count (a dry run shows both parts)."""
    from ..lib.policy.models import MetricKind

    return [name for name, metric in query.spec.metrics.items() if metric.aggregate == MetricKind.AVG]


def dry_run(conn: Connection, loaded: LoadedCollaboration, query: ApprovedQuery) -> DryRun:
    """Plan ``query``'s noise and read its consumer's remaining budget; draws nothing, charges nothing."""
    plans = plan_release(query.spec)
    selection = plan_key_selection(query.spec)
    epsilon, delta = release_cost(plans, selection)
    status = ledger.budget_status(conn, naming.results_schema(loaded.name), consumer_budget(loaded, query.spec.consumer))
    return DryRun(plans, selection, epsilon, delta, status)
