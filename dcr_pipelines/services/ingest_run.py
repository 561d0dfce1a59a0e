"""One ingest run of a dataset, start to end, with no Dagster in it: the ingest asset (defs/ingest.py) is its adapter.

Which uploads the run decides: a file named in the run's config (it must be waiting in the dataset's landing folder;
it is claimed into the queue first), the upload of an append-mode partition (a backfill re-processes the kept file), or
every waiting upload. The queue (services/ingest.py) validates and swaps each in; this module turns its outcome into
what the run reports: :class:`Ingested` (metadata, the two checks, the data version) or :class:`IngestFailed` (the
run fails, the current data stay; it may carry the contract check's failed result).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import Connection
from ..store import uploads as queue
from . import ingest
from ._log import Log


@dataclass(frozen=True)
class Check:
    """An asset check's result: ``warn`` is a warning, not an error."""

    passed: bool
    metadata: dict[str, Any]
    warn: bool = False
    description: str | None = None


@dataclass(frozen=True)
class Ingested:
    metadata: dict[str, Any]
    contract: Check  # the current version meets the dataset's contract
    clean: Check  # every upload this run decided was accepted
    checksum: str  # the current version's: its data version


class IngestFailed(Exception):
    """The run fails and the current data stay; ``contract`` is the check result to record first, if any."""

    def __init__(self, message: str, contract: Check | None = None, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.contract, self.metadata = contract, metadata or {}


@dataclass(frozen=True)
class Run:
    """What the run was asked: a file waiting in the landing folder, a queued upload's number, an append partition."""

    path: str = ""
    upload: int = 0
    partition_key: str | None = None
    policy_sha256: str = ""
    add_partitions: Callable[[list[str]], None] = field(default=lambda keys: None)


def rejections(outcome: ingest.QueueOutcome) -> list[dict[str, Any]]:
    return [{"upload": u.seq, "file": u.file_name, "state": u.state, "reason": u.reason} for u in outcome.rejected]


def run(connect: Callable[[], Any], t: ingest.Target, asked_for: Run, log: Log) -> Ingested:
    """Decide the uploads ``asked_for`` names and report the dataset's current version; raises :class:`IngestFailed`."""
    try:
        return _run(connect, t, asked_for, log)
    except IngestFailed:
        raise
    except ingest.LandingRefused as exc:
        raise IngestFailed(f"upload refused, nothing read: {exc}") from None
    except Exception as exc:
        problem = ingest.infrastructure_problem(exc, t)
        if problem is None:
            raise
        raise IngestFailed(problem) from None


def _decide(conn: Connection, t: ingest.Target, asked_for: Run) -> tuple[ingest.QueueOutcome, int | None]:
    """The queue's outcome for the uploads the run is for, and the number of the one it names (if it names one)."""
    asked: int | None = asked_for.upload or None
    folder, append = t.folder(), t.spec.mode == "append"
    if asked_for.path:
        path = Path(asked_for.path)
        if os.path.normpath(path.parent) != os.path.normpath(folder) or path.name.startswith("_"):
            raise IngestFailed(f"upload refused: {path} is outside the landing folder {folder}")
        with ingest.locked(conn, t):
            claimed = ingest.claim_inbox(conn, t, only=path)
        if not claimed:
            raise IngestFailed(f"upload refused: {path.name} is not waiting in {folder}")
        asked = claimed[0].seq
    if not append:
        return ingest.process_queue(conn, t), asked
    asked = queue.seq_of_partition(asked_for.partition_key or "")
    upload = queue.get(conn, asked) if asked else None
    if upload is None or upload.dataset != t.dataset or upload.collaboration != t.collaboration:
        raise IngestFailed(f"partition {asked_for.partition_key} is no upload of {t.collaboration}/{t.party}/{t.dataset}")
    current = ingest.current_version(conn, t)
    if upload.state == "accepted" and current is not None and current.contract_sha256 == t.contract_sha256:
        # a backfill: re-process the kept file (a changed contract re-checks every file instead)
        try:
            ingest.reprocess(conn, t, upload.seq)
        except ingest.UploadRejected as exc:
            raise IngestFailed(f"re-processing upload #{upload.seq} failed, current data kept: {exc}") from None
        return ingest.QueueOutcome(decided=[queue.get(conn, upload.seq)]), asked  # type: ignore[list-item]
    return ingest.process_queue(conn, t, only_seq=upload.seq), asked


def _run(connect: Callable[[], Any], t: ingest.Target, asked_for: Run, log: Log) -> Ingested:
    c, party, name, append = t.collaboration, t.party, t.dataset, t.spec.mode == "append"
    with connect() as conn:
        outcome, asked = _decide(conn, t, asked_for)
        for note in outcome.repaired:
            log.warning(f"{name}: {note}")
        if append:
            new = [u.partition_key for u in queue.pending(conn, c, party, name)]
            if new:
                asked_for.add_partitions(new)
        current = ingest.current_version(conn, t)
        mine = queue.get(conn, asked) if asked else None
    for u in outcome.rejected:
        log.warning(f"upload #{u.seq} ({u.file_name}) {u.state}: {u.reason}")
    if mine is not None and mine.state not in ("accepted", "queued", "processing"):
        if mine.state == "duplicate":
            log.info(mine.reason or "")
        else:
            label = {"stale": "refused", "superseded": "not loaded"}.get(mine.state, "rejected")
            about = {"upload": mine.to_json()}
            raise IngestFailed(f"upload {label}, current data kept: {mine.reason} (quarantined with a report as {mine.stored_name})",
                               Check(False, about, warn=current is not None), about)
    if current is None:
        waiting = "; ".join(f"#{u.seq} {u.state}: {u.reason}" for u in outcome.rejected)
        raise IngestFailed(f"no accepted upload for {c}/{party}/{name} yet: put a file in {t.folder()} or run `dcr ingest`"
                           + (f" (refused: {waiting})" if waiting else ""))
    loaded_now = outcome.loaded[-1] if outcome.loaded else None
    if outcome.revalidation_failed:
        report = outcome.revalidation_report.to_json() if outcome.revalidation_report else {}
        contract = Check(False, {"error": outcome.revalidation_failed, "rules": report.get("rules", [])}, description=outcome.revalidation_failed)
        log.error(f"{name}: {outcome.revalidation_failed}")
    else:
        rules = loaded_now[1].to_json()["rules"] if loaded_now else []
        note = "re-checked against the changed contract" if outcome.revalidated else ("new upload checked" if loaded_now else "no new upload")
        contract = Check(True, {"rules": rules, "note": note})
    clean = Check(not outcome.rejected, {"refused": rejections(outcome)}, warn=True)
    upload = loaded_now[0] if loaded_now else (mine if mine is not None and mine.state == "accepted" else None)
    metadata: dict[str, Any] = {
        "version": current.version,
        "checksum_sha256": current.checksum,
        "row_count": current.row_count,
        "unchanged": loaded_now is None and not outcome.revalidated and not (append and upload is not None),
        "mode": t.spec.mode,
        "files_in_version": len(current.parts),
        "policy_sha256": asked_for.policy_sha256,
        "refused_uploads": rejections(outcome),
    }
    if upload is not None:
        metadata.update({
            "upload": upload.seq,
            "file_name": upload.file_name,
            "file_rows": int(upload.row_count or 0),
            "duplicate_rows": int(upload.duplicate_rows or 0),
            "dropped_duplicate_rows": int(upload.dropped_rows or 0),
            "file_sha256": upload.checksum or "",
        })
    if mine is not None and mine.state == "duplicate":
        metadata.update({"upload": mine.seq, "file_name": mine.file_name, "duplicate": mine.reason or ""})
    if loaded_now:
        metadata["null_fractions"] = loaded_now[2]
    log.info(f"{name}: version {current.version} current ({current.row_count:,} rows)"
             + (f", upload #{upload.seq} {upload.file_name} loaded" if loaded_now and upload else ", no new upload"))
    return Ingested(metadata, contract, clean, current.checksum)
