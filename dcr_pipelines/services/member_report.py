"""What one member of a collaboration may see of it, gathered for its report (`dcr report --member MEMBER`).

Only what the member is entitled to: the releases it receives, its own budget and who
spends on its data, the audit entries that touch its data (as `dcr audit --member`
exports them: other parties' row counts redacted), its own uploads, and the audit
chain's head to keep. Nothing of another party's uploads or of releases it does not receive.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..lib import naming
from ..lib.audit import Anchor
from ..lib.policy import LoadedCollaboration
from ..store import Connection, audit_chain, results, stages
from ..store import uploads as queue
from . import budget as budget_service


@dataclass(frozen=True)
class ReleaseView:
    query: str
    description: str
    rule: str
    consumer: str
    release_id: str
    released_at: dt.datetime
    epsilon: float
    params: dict[str, str]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class MemberView:
    collaboration: str
    member: str
    generated_at: dt.datetime
    datasets: list[str]
    releases: list[ReleaseView]
    earlier_releases: dict[str, int]
    budget: dict[str, Any] | None
    spending_on_its_data: list[dict[str, Any]]
    uploads: list[queue.Upload]
    activity: list[dict[str, Any]] = field(default_factory=list)
    chain_head: Anchor | None = None
    identifiers: list[stages.IdentifierQuality] = field(default_factory=list)  # its own datasets' identifiers, accepted and refused


def gather(conn: Connection, loaded: LoadedCollaboration, member: str, activity: list[dict[str, Any]], history: int = 10) -> MemberView:
    """``activity``: the audit entries that touch the member's data, already filtered and redacted for it (defs/audit.entries)."""
    c = loaded.name
    releases, earlier = [], {}
    for name, query in loaded.queries.items():
        if member not in query.spec.receivers:
            continue
        stored = results.recent_releases(conn, c, name, limit=history)
        if not stored:
            continue
        latest = stored[0]
        releases.append(ReleaseView(name, query.spec.description or "", query.spec.rule, query.spec.consumer, latest.release_id,
                                    latest.released_at, latest.epsilon, latest.params, latest.rows))
        earlier[name] = len(stored) - 1
    report = budget_service.report(conn, loaded)
    own = next((b for b in report["consumers"] if b["consumer"] == member), None)
    return MemberView(
        collaboration=c, member=member, generated_at=dt.datetime.now(dt.UTC),
        datasets=[name for name, ds in loaded.collaboration.datasets.items() if ds.owner == member],
        releases=releases, earlier_releases=earlier, budget=own, spending_on_its_data=report["owners"].get(member, []),
        uploads=queue.listing(conn, c, member), activity=activity,
        chain_head=audit_chain.head(conn, naming.results_schema(c), c),
        identifiers=_own_identifiers(conn, loaded, member),
    )


def _own_identifiers(conn: Connection, loaded: LoadedCollaboration, member: str) -> list[stages.IdentifierQuality]:
    own = [name for name, ds in loaded.collaboration.datasets.items() if ds.owner == member]
    try:
        counts = stages.staging_counts(conn, loaded, own)
    except psycopg.errors.UndefinedTable:  # not staged yet: nothing to show
        conn.rollback()
        return []
    return stages.identifier_quality(loaded, counts, owner=member)
