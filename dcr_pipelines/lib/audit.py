"""The tamper-evident audit chain: one hash chain over everything an auditor relies on.

Entries, in one collaboration-wide order:

- ``release``: what was released, to whom, under which query hash, parameters,
  input versions and epsilon, with the SHA-256 of the rows *as stored* in the
  releases table and in the results table members read;
- ``charge``: every budget-ledger row (a release's charge, or the charge of a
  release that failed after its noise was drawn);
- ``ad_hoc`` and ``refusal``: every ad-hoc run, accepted (runner, query hash,
  datasets, threshold, rows and their SHA-256 as stored, rows withheld) or
  refused (runner, query hash, rule);
- ``policy``: each policy version the pipeline applied.

``entry_sha256 = sha256(canonical entry)`` and ``chain_sha256 =
sha256(previous chain_sha256 + entry_sha256)``, appended in the transaction
of the thing recorded, under a lock. ``verify`` (this module: pure) checks
the chain against fresh digests of the tables users read and against the
Dagster event log; an anchor (a chain head a party saved from an export)
proves the history up to it was not rewritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
KINDS = ("release", "charge", "ad_hoc", "refusal", "policy")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def rows_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of rows whatever their order (each row canonical, the list sorted)."""
    return hashlib.sha256(canonical(sorted(canonical(r) for r in rows)).encode()).hexdigest()


def timestamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def entry_digest(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(dict(entry)).encode()).hexdigest()


def link(previous: str, entry: str) -> str:
    return hashlib.sha256((previous + entry).encode()).hexdigest()


@dataclass(frozen=True)
class ChainRow:
    seq: int
    kind: str
    ref: str
    entry: dict[str, Any]
    entry_sha256: str
    prev_sha256: str
    chain_sha256: str


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Anchor:
    """A chain head saved outside the operator's database (every export carries one)."""

    collaboration: str
    seq: int
    chain_sha256: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Anchor:
        return cls(str(data["collaboration"]), int(data["seq"]), str(data["chain_sha256"]))


@dataclass
class Evidence:
    """What the tables users read say now, keyed as the chain entries refer to it."""

    releases: dict[str, dict[str, Any]] = field(default_factory=dict)  # release_id -> fields + rows_sha256 + results_sha256
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)  # ledger entry_id -> fields
    ad_hoc: dict[str, dict[str, Any]] = field(default_factory=dict)  # run_id -> runner, rows_sha256, ran_at, ...
    footprints: dict[tuple[str, str], str] = field(default_factory=dict)  # (source, id) -> digest of the people sets kept
    footprints_kept_since: str | None = None  # people sets of runs before this time may have expired (retention_days)


RELEASE_FIELDS = ("release_id", "query_name", "consumer", "receivers", "query_sha256", "params", "input_versions", "epsilon", "delta",
                  "rows_sha256", "results_sha256")
CHARGE_FIELDS = ("entry_id", "consumer", "query_name", "release_id", "epsilon", "delta", "charged_at")
AD_HOC_FIELDS = ("run_id", "runner", "query_sha256", "rows", "rows_sha256", "suppressed", "ran_at")
EMPTY_FOOTPRINTS = hashlib.sha256().hexdigest()  # no people set recorded


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return canonical(a) == canonical(b)


def verify_chain(chain: Sequence[ChainRow], anchors: Iterable[Anchor] = ()) -> list[Problem]:
    """Every broken link, edited entry or anchor the chain no longer matches."""
    problems: list[Problem] = []
    previous = GENESIS
    by_seq = {row.seq: row for row in chain}
    for row in chain:
        where = f"audit entry {row.seq} ({row.kind} {row.ref})"
        if entry_digest(row.entry) != row.entry_sha256:
            problems.append(Problem(where, "it was edited (its recomputed hash differs)"))
        if row.prev_sha256 != previous:
            problems.append(Problem(where, "an entry before it was deleted, inserted or edited (its link to the previous entry is broken)"))
        if link(row.prev_sha256, row.entry_sha256) != row.chain_sha256:
            problems.append(Problem(where, "its chain hash was edited"))
        previous = row.chain_sha256
    for anchor in anchors:
        anchored = by_seq.get(anchor.seq)
        if anchored is None:
            problems.append(Problem(f"anchor at entry {anchor.seq}", "the entry a party saved no longer exists (history was truncated)"))
        elif anchored.chain_sha256 != anchor.chain_sha256:
            problems.append(Problem(f"anchor at entry {anchor.seq}", "the chain differs from the head a party saved (history was rewritten)"))
    return problems


def verify_tables(chain: Sequence[ChainRow], evidence: Evidence) -> list[Problem]:
    """The chain against the tables users read: every row chained, every chained row present and unchanged."""
    problems: list[Problem] = []
    checks = (("release", evidence.releases, RELEASE_FIELDS, "release"), ("charge", evidence.charges, CHARGE_FIELDS, "budget charge"),
              ("ad_hoc", evidence.ad_hoc, AD_HOC_FIELDS, "ad-hoc run"))
    for kind, current, fields, noun in checks:
        chained = {row.ref: row for row in chain if row.kind == kind}
        for ref, row in chained.items():
            found = current.get(ref)
            if found is None:
                problems.append(Problem(f"{noun} {ref}", "it is in the audit chain but missing from its table (deleted)"))
                continue
            changed = [f for f in fields if f in row.entry and not _same(row.entry[f], found.get(f))]
            if changed:
                problems.append(Problem(f"{noun} {ref}", f"its {', '.join(changed)} changed since it was chained (edited)"))
        for ref in current:
            if ref not in chained:
                problems.append(Problem(f"{noun} {ref}", "it is in its table but not in the audit chain (inserted)"))
    return problems + verify_footprints(chain, evidence)


def verify_footprints(chain: Sequence[ChainRow], evidence: Evidence) -> list[Problem]:
    """The people sets the difference checks compare with, against the digests chained with each run and release.

    A set may be missing only once it is older than the retention window; any other edit, deletion or insertion
    (which would re-open rows the checks withhold) is a problem.
    """
    problems: list[Problem] = []
    chained: dict[tuple[str, str], ChainRow] = {}
    for row in chain:
        source = {"ad_hoc": "ad_hoc", "release": "release"}.get(row.kind)
        if source and "footprints_sha256" in row.entry:
            chained[(source, row.ref)] = row
    for (source, ref), row in chained.items():
        found = evidence.footprints.get((source, ref), EMPTY_FOOTPRINTS)
        if found == row.entry["footprints_sha256"]:
            continue
        when = str(row.entry.get("ran_at") or row.entry.get("released_at") or "")
        expired = found == EMPTY_FOOTPRINTS and evidence.footprints_kept_since is not None and when and when < evidence.footprints_kept_since
        if not expired:
            noun = "ad-hoc run" if source == "ad_hoc" else "release"
            problems.append(Problem(f"{noun} {ref}", "the people sets recorded for its difference checks were edited or deleted "
                                                     "(dcr_meta.released_people differs from the digest chained with it)"))
    legacy = {(("ad_hoc" if r.kind == "ad_hoc" else "release"), r.ref) for r in chain if r.kind in ("ad_hoc", "release")}
    for key in evidence.footprints:
        if key not in chained and key not in legacy:
            problems.append(Problem(f"{key[0]} {key[1]}", "people sets are recorded for it, but no run or release of the audit chain made them (inserted)"))
    return problems


def verify_events(chain: Sequence[ChainRow], events: Iterable[Mapping[str, Any]]) -> list[Problem]:
    """Release entries against their mirror in the Dagster event log."""
    problems: list[Problem] = []
    by_release: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        by_release.setdefault(str(event.get("release_id")), []).append(event)
    releases = {row.ref: row for row in chain if row.kind == "release"}
    for rid, row in releases.items():
        matching = by_release.get(rid, [])
        if not matching:
            problems.append(Problem(f"release {rid}", "its entry is missing from the Dagster event log (deleted)"))
        for event in matching:
            entry = event.get("audit_entry")
            if not isinstance(entry, Mapping) or entry_digest(entry) != event.get("audit_entry_sha256") or event.get("audit_chain_sha256") != row.chain_sha256:
                problems.append(Problem(f"release {rid}", "its Dagster event was edited (the event's entry or chain hash differs)"))
    for rid in by_release:
        if rid not in releases:
            problems.append(Problem(f"release {rid}", "it is in the Dagster event log but not in the audit chain (deleted)"))
    return problems


def verify_referenced(chain: Sequence[ChainRow], referenced: Iterable[str]) -> list[Problem]:
    """Every chain hash the Dagster event log recorded must still be in the chain (catches a deleted head)."""
    present = {row.chain_sha256 for row in chain}
    return [Problem("audit chain", f"the entry with chain hash {h[:12]}... that the Dagster event log recorded is missing (deleted)")
            for h in sorted(set(referenced)) if h and h not in present]


def verify_runs(chain: Sequence[ChainRow], stored_runs: Iterable[str]) -> list[Problem]:
    """Every run the chain names (a release's, an ad-hoc run's, a refusal's) is in Dagster's run storage: a run that went
    to another storage, or was deleted, leaves the audit trail without its events."""
    present = set(stored_runs)
    problems = []
    for row in chain:
        run_id = row.entry.get("run_id")
        if row.kind in ("release", "ad_hoc", "refusal") and run_id and run_id not in present:
            problems.append(Problem(f"audit entry {row.seq} ({row.kind} {row.ref})",
                                    f"its run {run_id} is not in the Dagster run storage (deleted, or written to another storage)"))
    return problems
