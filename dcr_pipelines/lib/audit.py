"""The tamper-evident part of the audit trail: a hash chain over releases.

Every new release gets ``entry = sha256(canonical JSON of what was released,
to whom, under which query hash, parameters, input versions and epsilon)``
and ``chain = sha256(previous chain + entry)``, computed under a
collaboration-wide lock in the release's own transaction. The same values go
into the release's Dagster materialization. ``verify`` recomputes the chain
from the releases table and checks every link against the Dagster event log,
so an edited or deleted entry on either side is detected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
ENTRY_FIELDS = (
    "release_id", "query_name", "consumer", "receivers", "query_sha256", "params",
    "input_versions", "epsilon", "delta", "rows_sha256", "released_at",
)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def rows_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(canonical(list(rows)).encode()).hexdigest()


def timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def entry_digest(entry: Mapping[str, Any]) -> str:
    """SHA-256 of a release entry's fields (a missing field is an error: it would weaken the chain)."""
    return hashlib.sha256(canonical({f: entry[f] for f in ENTRY_FIELDS}).encode()).hexdigest()


def link(previous: str, entry: str) -> str:
    return hashlib.sha256((previous + entry).encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    release_id: str
    message: str

    def __str__(self) -> str:
        return f"release {self.release_id}: {self.message}"


def verify(table_rows: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """Every problem with the chain: table rows (in chain order) against the Dagster release events."""
    problems: list[Problem] = []
    previous = GENESIS
    seen: set[str] = set()
    by_release = {}
    for event in events:
        by_release.setdefault(str(event.get("release_id")), []).append(event)
    for row in table_rows:
        rid = str(row["release_id"])
        seen.add(rid)
        entry = entry_digest(row)
        if entry != row["entry_sha256"]:
            problems.append(Problem(rid, "its stored entry was edited (the recomputed entry hash differs)"))
        if row["prev_sha256"] != previous:
            problems.append(Problem(rid, "the entry before it was deleted or edited (its link to the previous entry is broken)"))
        if link(row["prev_sha256"], row["entry_sha256"]) != row["chain_sha256"]:
            problems.append(Problem(rid, "its chain hash was edited"))
        previous = row["chain_sha256"]
        matching = by_release.get(rid, [])
        if not matching:
            problems.append(Problem(rid, "its entry is missing from the Dagster event log (deleted)"))
        for event in matching:
            try:
                event_entry = entry_digest(event)
            except KeyError as exc:
                problems.append(Problem(rid, f"its Dagster event lacks {exc.args[0]} (edited)"))
                continue
            if event_entry != event.get("audit_entry_sha256") or event.get("audit_chain_sha256") != row["chain_sha256"]:
                problems.append(Problem(rid, "its Dagster event was edited (the event's entry or chain hash differs)"))
    for rid in by_release:
        if rid not in seen:
            problems.append(Problem(rid, "it is in the Dagster event log but missing from the releases table (deleted)"))
    return problems
