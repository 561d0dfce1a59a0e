"""Uploads: landing as a queue with exactly-once processing, each accepted file loaded, validated and swapped in atomically.

The landing tree of a dataset (``<landing>/<collaboration>/<party>/<dataset>``)::

    ./                  the inbox: parties drop files here (or ``dcr ingest`` lands them straight in the queue)
    _uploads/...        the queue: ``<seq>__<name>``, one file per claimed upload
    _accepted/...       accepted files (kept: a backfill or a changed contract re-processes them)
    _quarantine/...     refused files, each beside ``<seq>__<name>.report.json``

1. **Claim.** A file gets its identity the moment it is claimed: an arrival
   sequence from ``dcr_meta.upload_seq`` and, when it is processed, its
   SHA-256. It is renamed (atomic, same file system) into the queue, so two
   uploads with one name are two uploads. A symlink or special file is never
   opened or followed: it is moved, as an entry, to quarantine with a reason.
2. **Process** (holding the dataset's lock). The upload is marked
   ``processing`` (one more attempt); it is streamed into a text load table
   with ``COPY``, cast into the declared types, de-duplicated as the policy
   says, and checked against the contract with great-expectations in
   PostgreSQL, as a table of its own (``<dataset>__u<seq>``).
3. **Swap.** One transaction repoints the dataset's view at the new list of
   upload tables (one in replace mode, every accepted file in append mode),
   records the version and marks the upload ``accepted``: the version and
   the upload's state cannot disagree. A bad file is marked ``quarantined``
   and moved beside a JSON report; the current version stays as it was.
4. **Restart.** :func:`reconcile` repairs what a crash left between those
   steps: an unrecorded file in the queue is recorded, a decided file is
   moved where it belongs, an upload whose processing was interrupted
   :data:`MAX_ATTEMPTS` times is quarantined; :func:`drop_leftovers` drops
   tables no version refers to.

An upload never replaces a version that arrived after it (``stale``); in
replace mode, of several waiting files only the newest is loaded (the older
ones are ``superseded``); a file whose content is already loaded is a
``duplicate``. Every decision is a row of ``dcr_meta.uploads`` with its reason.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..lib import identifiers
from ..lib.policy.models import ColumnType, Dataset
from ..lib.upload_files import MAX_LINE_CHARS, SUFFIXES, FileProblem, accepted_suffix, inspect_entry, open_regular, text_lines_blocks
from ..lib.validation import ROW_NUMBER, ROWS_IN_REPORT, RuleOutcome, ValidationReport, sqlalchemy_url, validate_table
from ..store import migrations, phones
from ..store import uploads as queue
from ..store.uploads import Upload

CHUNK = 1 << 20
BATCH_ROWS = 50_000
KEEP_VERSIONS = 2  # the current version's tables and the previous one's stay; older ones are dropped
MAX_ATTEMPTS = 3  # processing interrupted this often (killed, crashed): the upload is quarantined instead of retried
IGNORED_PREFIXES = (".", "_")
IGNORED_SUFFIXES = (".tmp", ".part", ".report.json")
csv.field_size_limit(MAX_LINE_CHARS + 1)


class LandingRefused(Exception):
    """A folder on a dataset's landing path cannot be trusted (a symbolic link); nothing was read from it."""


def contained(t: Target) -> None:
    """Refuse a landing path with a symbolic link in it (the collaboration's, the party's or the dataset's folder, in
    the inbox or the queue, accepted and quarantine areas): a party that links its inbox to another party's would
    take that party's uploads as its own. Links are reported, never followed."""
    for area in ("", "_uploads", "_accepted", "_quarantine"):
        path = t.landing
        for part in ([area] if area else []) + [t.collaboration, t.party, t.dataset]:
            path = path / part
            if path.is_symlink():
                raise LandingRefused(f"landing folder {path} is a symbolic link (to {os.readlink(path)}): landing folders are never followed, "
                                     "since a linked inbox could take another party's uploads; replace it with a real folder")


MAX_NAME_BYTES = 200  # a stored name is "<seq>__<name>" and must stay under the file system's 255 bytes


def name_problem(name: str) -> str | None:
    """Why a file name cannot be stored as it is, or None."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "it has control characters"
    if len(encoded) > MAX_NAME_BYTES:
        return f"it is {len(encoded)} bytes long, more than the {MAX_NAME_BYTES} a stored upload name may have"
    return None


def safe_name(name: str) -> str:
    """A generated stand-in for an unusable name (stable for the same name)."""
    return "unusable-name-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class UploadRejected(Exception):
    """The upload breaks the dataset's contract or cannot be read; nothing was changed."""

    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Target:
    """One dataset of one collaboration: where its files and tables live and what its contract is."""

    collaboration: str
    party: str
    dataset: str
    spec: Dataset
    schema: str
    landing: Path
    database_url: str
    tokenised: bool = False
    phone_region: str = "US"  # the collaboration's identity.phone_default_country

    def folder(self, area: str = "") -> Path:
        base = self.landing / area if area else self.landing
        return base / self.collaboration / self.party / self.dataset

    @property
    def inbox(self) -> Path:
        return self.folder()

    @property
    def queue_dir(self) -> Path:
        return self.folder("_uploads")

    @property
    def accepted_dir(self) -> Path:
        return self.folder("_accepted")

    @property
    def quarantine_dir(self) -> Path:
        return self.folder("_quarantine")

    @property
    def contract_sha256(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()

    @property
    def lock_name(self) -> str:
        return lock_name(self.collaboration, self.dataset)


def lock_name(collab: str, dataset: str) -> str:
    """The advisory lock every change to a dataset's queue and versions holds."""
    return f"dcr-ingest:{collab}:{dataset}"


@contextmanager
def locked(conn: psycopg.Connection, t: Target) -> Iterator[None]:
    """Hold the dataset's lock on ``conn`` itself (re-entrant). On the working session, not a side connection: if this
    process is killed, the lock goes only when the server has finished or rolled back this session's last statement,
    so the next consumer never races a dying one."""
    conn.execute("select pg_advisory_lock(hashtext(%s))", (t.lock_name,))
    try:
        yield
    finally:
        with suppress(psycopg.Error):
            conn.execute("select pg_advisory_unlock(hashtext(%s))", (t.lock_name,))


@dataclass(frozen=True)
class Version:
    version: int
    checksum: str
    row_count: int
    parts: tuple[str, ...]
    upload_seq: int | None
    contract_sha256: str | None


@dataclass
class QueueOutcome:
    """What one pass over a dataset's queue decided."""

    decided: list[Upload] = field(default_factory=list)
    loaded: list[tuple[Upload, ValidationReport, dict[str, float]]] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    revalidation_failed: str | None = None
    revalidation_report: ValidationReport | None = None
    revalidated: bool = False

    @property
    def rejected(self) -> list[Upload]:
        return [u for u in self.decided if u.state != "accepted"]


def file_checksum(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open_regular(path) as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def ensure_meta(conn: psycopg.Connection) -> None:
    migrations.ensure(conn, "meta")


def current_versions(conn: psycopg.Connection, collaboration: str) -> dict[str, dict[str, object]]:
    """``party.dataset`` -> {version, checksum} of every current upload of a collaboration."""
    ensure_meta(conn)
    rows = conn.execute(
        "select party, dataset, version, checksum from dcr_meta.dataset_versions "
        "where collaboration = %s and is_current order by party, dataset",
        (collaboration,),
    ).fetchall()
    return {f"{p}.{d}": {"version": v, "checksum": c} for p, d, v, c in rows}


@dataclass(frozen=True)
class Staged:
    """What the staged data are, per ``party.dataset``, as Dagster's event log records it (see ``defs/freshness.py``).

    ``read``: the data version (upload-content checksum) of the upload event the dataset's staging materialization was
    built from (its provenance). ``recorded``: the raw asset's latest data version in the event log. ``warehouse``: the
    current version's checksum in ``dcr_meta.dataset_versions``, a consistency check only: the event log must have
    recorded every version the warehouse holds."""

    read: dict[str, str | None]
    recorded: dict[str, str | None]
    warehouse: dict[str, str]

    def reason(self, key: str) -> str | None:
        if self.recorded.get(key) != self.warehouse[key]:
            return "a version the event log has not recorded (a command that changed it stopped before recording it)"
        if self.read.get(key) != self.recorded.get(key):
            return "a newer upload or a withdraw, not yet through staging"
        return None

    @property
    def stale(self) -> list[str]:
        """``party.dataset`` of every dataset the staged data are not the current version of: an answer over them would
        be labelled with data it does not hold."""
        return sorted(k for k in self.warehouse if self.reason(k))

    def versions(self) -> dict[str, dict[str, str | None]]:
        """What an answer over the staged data reads, per dataset: the content checksum staging was built from."""
        return {k: {"checksum": self.read.get(k)} for k in sorted(self.warehouse)}

    def describe(self) -> str:
        """The stale datasets and why, for a refusal."""
        by_reason: dict[str, list[str]] = {}
        for k in self.stale:
            by_reason.setdefault(str(self.reason(k)), []).append(k)
        return "; ".join(f"{', '.join(keys)}: {why}" for why, keys in by_reason.items())


def versions(conn: psycopg.Connection, collaboration: str, party: str, dataset: str) -> list[dict[str, Any]]:
    """Every accepted version of a dataset, newest first (the audit trail of uploads)."""
    ensure_meta(conn)
    rows = conn.execute(
        "select version, checksum, row_count, file_name, loaded_at, is_current, upload_seq, parts from dcr_meta.dataset_versions "
        "where collaboration = %s and party = %s and dataset = %s order by version desc",
        (collaboration, party, dataset),
    ).fetchall()
    keys = ("version", "checksum", "row_count", "file_name", "loaded_at", "is_current", "upload_seq", "parts")
    return [dict(zip(keys, r, strict=False)) for r in rows]


def contract_breaches(conn: psycopg.Connection, collaboration: str, datasets: dict[str, Dataset]) -> list[str]:
    """Datasets whose current version was not checked against the dataset's contract as the policy states it now."""
    ensure_meta(conn)
    rows = conn.execute(
        "select dataset, version, contract_sha256 from dcr_meta.dataset_versions where collaboration = %s and is_current", (collaboration,)
    ).fetchall()
    breaches = []
    for dataset, version, checked in rows:
        spec = datasets.get(dataset)
        if spec is not None and checked is not None and checked != hashlib.sha256(spec.model_dump_json().encode()).hexdigest():
            breaches.append(f"{dataset} version {version}")
    return breaches


def current_version(conn: psycopg.Connection, t: Target) -> Version | None:
    ensure_meta(conn)
    row = conn.execute(
        "select version, checksum, row_count, parts, upload_seq, contract_sha256 from dcr_meta.dataset_versions "
        "where collaboration = %s and party = %s and dataset = %s and is_current",
        (t.collaboration, t.party, t.dataset),
    ).fetchone()
    if row is None:
        return None
    parts = tuple(row[3]) if row[3] is not None else (f"{t.dataset}__v{row[0]}",)  # versions made before the queue: one table
    return Version(int(row[0]), str(row[1]), int(row[2]), parts, row[4], row[5])


def infrastructure_problem(exc: BaseException, t: Target) -> str | None:
    """One line for a failure that is not the file's fault (the upload stays queued and is retried), or None."""
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("53"):
        primary = exc.diag.message_primary or str(exc).splitlines()[0]
        return (f"the database server ran out of resources while loading {t.dataset} ({primary}); nothing was changed and the upload "
                "stays queued for the next run: free disk space (or memory) on the database server")
    if isinstance(exc, psycopg.OperationalError):
        first = (str(exc).strip().splitlines() or ["connection lost"])[0]
        return (f"the database connection failed while processing {t.dataset}'s uploads ({first}); nothing was changed and the upload "
                "stays queued: check that the database is up, then run it again")
    if isinstance(exc, PermissionError):
        return (f"permission denied on {exc.filename or t.landing}: the landing tree {t.landing} must be writable by the pipeline's user; "
                "the upload was not moved")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk holding {exc.filename or t.landing}: free space there; the upload stays queued for the next run"
    return None


# --- the queue: landing, claiming, reconciling ---------------------------------------------------


def land_copy(conn: psycopg.Connection, t: Target, source: Path) -> Upload:
    """Copy ``source`` (a user's file, outside the landing tree) straight into the queue as a new upload."""
    contained(t)
    problem = name_problem(source.name)
    if problem:
        raise UploadRejected(f"the file name {source.name!r} is unusable ({problem}); rename it")
    seq = queue.next_seq(conn)
    t.queue_dir.mkdir(parents=True, exist_ok=True)
    name = given_name(conn, t, source.name)
    partial = t.queue_dir / f".{queue.stored_name(seq, name)}.{os.getpid()}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with source.open("rb") as src, partial.open("wb") as dst:
            while block := src.read(CHUNK):
                digest.update(block)
                size += len(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(partial, t.queue_dir / queue.stored_name(seq, name))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return queue.register(conn, seq, t.collaboration, t.party, t.dataset, name, checksum=digest.hexdigest(), size_bytes=size)


def given_name(conn: psycopg.Connection, t: Target, name: str) -> str:
    """The name the party gave a file, without an earlier upload's queue number.

    A file sent again from the landing tree's own folders (a quarantined file moved back into the inbox once fixed,
    an accepted one uploaded again) is still called ``<seq>__<name>``; claimed as it is, it would be stored as
    ``<new seq>__<seq>__<name>``. When the prefix is the number of an earlier upload of this dataset with that very
    name, it is dropped, so a stored name carries one number. Any other name (``20260301__export.csv``) is kept.
    """
    parsed = queue.parse_stored_name(name)
    if parsed is None:
        return name
    earlier = queue.get(conn, parsed[0])
    if earlier is not None and (earlier.collaboration, earlier.party, earlier.dataset, earlier.file_name) == (
            t.collaboration, t.party, t.dataset, parsed[1]):
        return parsed[1]
    return name


def claim_inbox(conn: psycopg.Connection, t: Target, only: Path | None = None) -> list[Upload]:
    """Move every file waiting in the inbox into the queue (oldest first); odd entries go to quarantine with a reason."""
    contained(t)
    if not t.inbox.is_dir():
        return []
    seen: dict[str, tuple[int, int]] = {}
    for entry in os.scandir(t.inbox):
        if entry.name.startswith(IGNORED_PREFIXES) or entry.name.endswith(IGNORED_SUFFIXES):
            continue
        if only is not None and entry.name != only.name:
            continue
        try:
            info = os.lstat(entry.path)
        except FileNotFoundError:
            continue
        seen[entry.name] = (info.st_mtime_ns, info.st_size)
    entries = sorted((mtime, name) for name, (mtime, _) in _settled(t.inbox, seen).items())
    claimed = []
    for _, name in entries:
        source = t.inbox / name
        unusable = name_problem(name)
        reason: str | None
        if unusable:  # stored under a generated name, the original (escaped) in the report: the next upload still loads
            reason = f"the file name {name.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')!r} is unusable ({unusable}); rename it"
            name = safe_name(name)
        else:
            reason = inspect_entry(source)
        if reason is None and not accepted_suffix(name, t.spec.format.type):
            reason = f"not a {t.spec.format.type} upload: names end in {', '.join(SUFFIXES[t.spec.format.type])}"
        seq = queue.next_seq(conn)
        folder = t.quarantine_dir if reason else t.queue_dir
        folder.mkdir(parents=True, exist_ok=True)
        name = given_name(conn, t, name)
        try:
            os.rename(source, folder / queue.stored_name(seq, name))
        except FileNotFoundError:
            continue  # another process claimed it first
        size = os.lstat(folder / queue.stored_name(seq, name)).st_size
        upload = queue.register(conn, seq, t.collaboration, t.party, t.dataset, name, checksum=None, size_bytes=size,
                                state="quarantined" if reason else "queued", reason=f"{name}: {reason}" if reason else None)
        if reason:
            _write_report(t, upload)
        claimed.append(upload)
    return claimed


def settle_seconds() -> float:
    """How long a file must stay unchanged (size and modification time) before it is claimed (DCR_SETTLE_SECONDS, default 2)."""
    try:
        return max(0.0, float(os.environ.get("DCR_SETTLE_SECONDS", "2")))
    except ValueError:
        return 2.0


def _settled(folder: Path, seen: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The entries that have not changed for the settle interval: a file still being written under its final name is
    left in the inbox for a later pass (it was once loaded in part). Waits at most one interval, once."""
    settle = settle_seconds()
    now = time.time_ns()
    fresh = {n: v for n, v in seen.items() if now - v[0] < settle * 1e9}
    if not fresh:
        return seen
    time.sleep(max(0.0, (max(v[0] for v in fresh.values()) + settle * 1e9 - now) / 1e9))
    out = {n: v for n, v in seen.items() if n not in fresh}
    for name, before in fresh.items():
        try:
            info = os.lstat(folder / name)
        except FileNotFoundError:
            continue
        if (info.st_mtime_ns, info.st_size) == before:
            out[name] = before
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reconcile(conn: psycopg.Connection, t: Target) -> list[str]:
    """Finish what a crash interrupted; returns what was repaired (for the run's log)."""
    notes: list[str] = []
    known = {u.seq: u for u in queue.listing(conn, t.collaboration, t.party, t.dataset, limit=1_000_000)}
    if t.queue_dir.is_dir():
        for entry in sorted(os.scandir(t.queue_dir), key=lambda e: e.name):
            if entry.name.startswith(".") and entry.name.endswith(".part"):
                found = re.search(r"\.(\d+)\.part$", entry.name)
                if not found or not pid_alive(int(found.group(1))):
                    Path(entry.path).unlink(missing_ok=True)
                    notes.append(f"removed {entry.name}: a copy interrupted before it landed")
                continue
            parsed = queue.parse_stored_name(entry.name)
            if parsed is None:
                continue
            seq, name = parsed
            upload = known.get(seq)
            if upload is None:
                upload = queue.register(conn, seq, t.collaboration, t.party, t.dataset, name, checksum=None, size_bytes=os.lstat(entry.path).st_size)
                known[seq] = upload
                notes.append(f"upload #{seq} ({name}) was claimed but not recorded (interrupted): queued now")
            elif upload.state in queue.TERMINAL:
                _file_away(t, upload)
                notes.append(f"upload #{seq} ({name}) was {upload.state} but its file was still queued: moved")
    for upload in known.values():
        if upload.state in ("queued", "processing") and not os.path.lexists(t.queue_dir / upload.stored_name):
            reason = f"{upload.file_name}: the file left the queue folder before it was loaded; upload it again"
            queue.decide(conn, upload.seq, "quarantined", reason)
            notes.append(f"upload #{upload.seq}: {reason}")
        elif upload.state == "processing" and upload.attempts >= MAX_ATTEMPTS:
            reason = (f"{upload.file_name}: processing was interrupted {upload.attempts} times (the process was killed or crashed "
                      "while loading it); check the file and the server's resources, then upload it again")
            queue.decide(conn, upload.seq, "quarantined", reason)
            _file_away(t, queue.get(conn, upload.seq))  # type: ignore[arg-type]
            notes.append(f"upload #{upload.seq}: {reason}")
    if t.quarantine_dir.is_dir():
        for entry in os.scandir(t.quarantine_dir):
            parsed = queue.parse_stored_name(entry.name)
            if parsed is None or entry.name.endswith(".report.json") or parsed[0] in known:
                continue
            seq, name = parsed
            reason = inspect_entry(Path(entry.path)) or f"not a {t.spec.format.type} upload"
            upload = queue.register(conn, seq, t.collaboration, t.party, t.dataset, name, checksum=None, size_bytes=None,
                                    state="quarantined", reason=f"{name}: {reason}")
            _write_report(t, upload)
            notes.append(f"upload #{seq} ({name}) was quarantined but not recorded (interrupted): recorded")
    return notes


def _file_away(t: Target, upload: Upload) -> None:
    """Move a decided upload's file out of the queue: accepted ones to _accepted, the rest to _quarantine with a report."""
    source = t.queue_dir / upload.stored_name
    folder = t.accepted_dir if upload.state == "accepted" else t.quarantine_dir
    folder.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(source):
        os.replace(source, folder / upload.stored_name)
    if upload.state != "accepted":
        _write_report(t, upload)


def _write_report(t: Target, upload: Upload, report: ValidationReport | None = None) -> None:
    body = {"upload": upload.to_json(), "error": upload.reason, **(report.to_json() if report else {})}
    path = t.quarantine_dir / f"{upload.stored_name}.report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("." + path.name + ".tmp")
    partial.write_text(json.dumps(body, indent=2, default=str) + "\n")
    partial.replace(path)


def drop_leftovers(conn: psycopg.Connection, t: Target) -> list[str]:
    """Drop the dataset's tables that no kept version refers to (loads and versions left by a killed run)."""
    keep: set[str] = set()
    rows = conn.execute(
        "select version, parts from dcr_meta.dataset_versions where collaboration = %s and party = %s and dataset = %s "
        "order by version desc limit %s",
        (t.collaboration, t.party, t.dataset, KEEP_VERSIONS),
    ).fetchall()
    for version, parts in rows:
        keep.update(parts if parts is not None else [f"{t.dataset}__v{version}"])
    prefix = f"{t.dataset}__"
    tables = conn.execute(
        "select table_name from information_schema.tables where table_schema = %s and table_type = 'BASE TABLE' and left(table_name, %s) = %s",
        (t.schema, len(prefix), prefix),
    ).fetchall()
    dropped = []
    for (name,) in tables:
        if name not in keep and re.fullmatch(re.escape(prefix) + r"(v\d+|u\d+(_r\d+)?)(__l|__load)?", name):
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(t.schema, name)))
            dropped.append(name)
    return dropped


# --- processing ---------------------------------------------------------------------------


def intake(conn: psycopg.Connection, t: Target) -> list[Upload]:
    """Repair what a crash left and claim the inbox (holding the dataset's lock); the uploads waiting now."""
    ensure_meta(conn)
    with locked(conn, t):
        reconcile(conn, t)
        claim_inbox(conn, t)
        return queue.pending(conn, t.collaboration, t.party, t.dataset)


def process_queue(conn: psycopg.Connection, t: Target, *, only_seq: int | None = None) -> QueueOutcome:
    """Claim the inbox, repair what a crash left, decide every waiting upload, re-check the current version if the
    contract changed; all of it holding the dataset's lock on ``conn`` (autocommit mode)."""
    ensure_meta(conn)
    with locked(conn, t):
        return _process_queue(conn, t, only_seq)


def _process_queue(conn: psycopg.Connection, t: Target, only_seq: int | None) -> QueueOutcome:
    ensure_meta(conn)
    outcome = QueueOutcome()
    outcome.repaired += reconcile(conn, t)
    outcome.repaired += [f"dropped leftover table {n}" for n in drop_leftovers(conn, t)]
    outcome.decided += [u for u in claim_inbox(conn, t) if u.state != "queued"]
    waiting = queue.pending(conn, t.collaboration, t.party, t.dataset)
    if only_seq is not None and t.spec.mode == "append":
        waiting = [u for u in waiting if u.seq == only_seq]
    if t.spec.mode == "replace" and len(waiting) > 1:
        newest = waiting[-1]
        for older in waiting[:-1]:
            reason = (f"{older.file_name}: upload #{newest.seq} ({newest.file_name}) arrived later and was waiting too; "
                      "in replace mode only the newest waiting file is loaded")
            outcome.decided.append(_finish(conn, t, older, "superseded", reason))
        waiting = [newest]
    for upload in waiting:
        _process_one(conn, t, upload, outcome)
    revalidate(conn, t, outcome)
    map_phones(conn, t)
    return outcome


def map_phones(conn: psycopg.Connection, t: Target) -> int:
    """The E.164 form of every phone number of the dataset's current version not mapped yet (``store.phones``); the
    normalised model joins it. A party matching at home normalises its own numbers (nothing here)."""
    columns = [c for c, spec in t.spec.identifier_columns.items() if spec.identifier is not None and spec.identifier.value == "phone"]
    if t.tokenised or not columns or conn.execute("select to_regclass(%s)", (f'"{t.schema}"."{t.dataset}"',)).fetchone()[0] is None:  # type: ignore[index]
        return 0
    return sum(phones.map_new(conn, t.schema, t.dataset, c, t.phone_region, identifiers.phone) for c in columns)


def _finish(conn: psycopg.Connection, t: Target, upload: Upload, state: str, reason: str | None,
            report: ValidationReport | None = None, **fields: Any) -> Upload:
    queue.decide(conn, upload.seq, state, reason, **fields)
    decided = queue.get(conn, upload.seq)
    assert decided is not None
    source = t.queue_dir / upload.stored_name
    t.quarantine_dir.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(source):
        os.replace(source, t.quarantine_dir / upload.stored_name)
    _write_report(t, decided, report)
    return decided


def _process_one(conn: psycopg.Connection, t: Target, upload: Upload, outcome: QueueOutcome) -> None:
    path = t.queue_dir / upload.stored_name
    problem = inspect_entry(path)
    if problem is not None:
        outcome.decided.append(_finish(conn, t, upload, "quarantined", f"{upload.file_name}: {problem}"))
        return
    try:
        checksum, size = file_checksum(path)
    except FileProblem as exc:
        outcome.decided.append(_finish(conn, t, upload, "quarantined", f"{upload.file_name}: {str(exc).split(': ', 1)[-1]}"))
        return
    upload = queue.begin(conn, upload.seq, checksum, size)
    current = current_version(conn, t)
    if t.spec.mode == "replace" and current is not None and current.upload_seq is not None and upload.seq < current.upload_seq:
        reason = (f"{upload.file_name}: upload #{current.upload_seq} is already current and arrived after this one (#{upload.seq}); "
                  "loading it would roll the dataset back to older data. If this file is the newest, upload it again")
        outcome.decided.append(_finish(conn, t, upload, "stale", reason))
        return
    same = _same_content(conn, t, current, checksum)
    if same is not None:
        outcome.decided.append(_finish(conn, t, upload, "duplicate", f"{upload.file_name}: same content as {same}; nothing to load"))
        return
    table = f"{t.dataset}__u{upload.seq}"
    try:
        report, nulls, duplicates, dropped = _build_part(conn, t, path, upload.file_name, table)
    except UploadRejected as exc:
        _drop(conn, t.schema, table)
        outcome.decided.append(_finish(conn, t, upload, "quarantined", str(exc), exc.report))
        return
    except psycopg.Error as exc:
        problem = infrastructure_problem(exc, t)
        if problem is None or isinstance(exc, psycopg.OperationalError) and not (exc.sqlstate or "").startswith("53"):
            raise  # a lost connection cannot requeue; the next start finds the upload processing and retries it
        # Not the file's fault (the server is out of disk or memory): back in the queue, this attempt not counted
        # towards the interrupted-attempts limit, the partial table dropped, the reason on record.
        with suppress(psycopg.Error):
            _drop(conn, t.schema, table)
        queue.requeue(conn, upload.seq, problem)
        raise
    parts = (table,) if t.spec.mode == "replace" or current is None else (*current.parts, table)
    total = report.row_count + (current.row_count if t.spec.mode == "append" and current is not None else 0)
    version_checksum = checksum if t.spec.mode == "replace" else _chain(current.checksum if current else "", checksum)
    try:
        with conn.transaction():
            version = _swap(conn, t, parts, version_checksum, total, upload.file_name, upload.seq,
                            _contract_of(t, current, rechecked_all=len(parts) == 1))
            queue.decide(conn, upload.seq, "accepted", None, version=version, row_count=report.row_count,
                         duplicate_rows=duplicates, dropped_rows=dropped)
    except BaseException:
        _drop(conn, t.schema, table)
        raise
    accepted = queue.get(conn, upload.seq)
    assert accepted is not None
    _file_away(t, accepted)
    outcome.decided.append(accepted)
    outcome.loaded.append((accepted, report, nulls))


def _chain(previous: str, checksum: str) -> str:
    return hashlib.sha256(f"{previous}+{checksum}".encode()).hexdigest()


def _same_content(conn: psycopg.Connection, t: Target, current: Version | None, checksum: str) -> str | None:
    if current is None:
        return None
    if t.spec.mode == "replace":
        return f"the current version {current.version}" if current.checksum == checksum else None
    seqs = [int(m.group(1)) for p in current.parts if (m := re.fullmatch(re.escape(t.dataset) + r"__u(\d+)(?:_r\d+)?", p))]
    row = conn.execute("select seq, file_name from dcr_meta.uploads where seq = any(%s) and checksum = %s order by seq limit 1",
                       (seqs, checksum)).fetchone()
    return f"upload #{row[0]} ({row[1]}), already appended" if row else None


def _contract_of(t: Target, current: Version | None, rechecked_all: bool) -> str | None:
    """The contract a new version has been checked against: the policy's own only when every part of it was checked
    under it; otherwise the current version's, so that a changed contract is still applied to the data (by
    ``revalidate``) and a withdraw or a new appended file cannot carry unchecked rows past it."""
    if rechecked_all or current is None or current.contract_sha256 == t.contract_sha256:
        return t.contract_sha256
    return current.contract_sha256


def _swap(conn: psycopg.Connection, t: Target, parts: tuple[str, ...], checksum: str, rows: int, file_name: str, upload_seq: int | None,
          contract: str | None) -> int:
    """Repoint the dataset's view at ``parts`` and record the version (inside the caller's transaction)."""
    columns = sql.SQL(", ").join(map(sql.Identifier, t.spec.columns))
    union = sql.SQL(" union all ").join(
        sql.SQL("select {} from {}").format(columns, sql.Identifier(t.schema, p)) for p in parts
    )
    conn.execute(sql.SQL("drop view if exists {}").format(sql.Identifier(t.schema, t.dataset)))
    conn.execute(sql.SQL("create view {} as {}").format(sql.Identifier(t.schema, t.dataset), union))
    latest = conn.execute(
        "select coalesce(max(version), 0) from dcr_meta.dataset_versions where collaboration = %s and party = %s and dataset = %s",
        (t.collaboration, t.party, t.dataset),
    ).fetchone()
    version = int(latest[0]) + 1  # type: ignore[index]
    conn.execute("update dcr_meta.dataset_versions set is_current = false where collaboration = %s and party = %s and dataset = %s",
                 (t.collaboration, t.party, t.dataset))
    conn.execute(
        "insert into dcr_meta.dataset_versions (collaboration, party, dataset, version, checksum, row_count, file_name, is_current, "
        "parts, upload_seq, contract_sha256) values (%s, %s, %s, %s, %s, %s, %s, true, %s, %s, %s)",
        (t.collaboration, t.party, t.dataset, version, checksum, rows, file_name, list(parts), upload_seq, contract),
    )
    drop_leftovers(conn, t)
    return version


def _drop(conn: psycopg.Connection, schema: str, table: str) -> None:
    for name in (table, f"{table}__l"):
        conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, name)))


def revalidate(conn: psycopg.Connection, t: Target, outcome: QueueOutcome) -> None:
    """If the contract changed since the current version was checked, re-process its accepted files under the new one.

    Passing makes a new version (same files, new contract); failing leaves the current version and says which
    rule the data now breaks (the ingest asset's blocking check fails on it).
    """
    current = current_version(conn, t)
    if current is None or current.contract_sha256 == t.contract_sha256:
        return
    outcome.revalidated = True
    built: list[str] = []
    parts: list[str] = []
    rows = 0
    try:
        for part in current.parts:
            found = re.fullmatch(re.escape(t.dataset) + r"__u(\d+)(?:_r\d+)?", part)
            upload = queue.get(conn, int(found.group(1))) if found else None
            path = t.accepted_dir / upload.stored_name if upload else None
            if upload is None or path is None or not path.is_file():
                raise UploadRejected(f"version {current.version} cannot be re-checked against the changed contract: the accepted file of "
                                     f"{part} is no longer under {t.accepted_dir}; upload the data again")
            _kept_intact(upload, path)
            table = f"{t.dataset}__u{upload.seq}_r{current.version + 1}"
            built.append(table)
            report, _, _, _ = _build_part(conn, t, path, upload.file_name, table)
            parts.append(table)
            rows += report.row_count
        with conn.transaction():
            _swap(conn, t, tuple(parts), _chain(current.checksum, "contract:" + t.contract_sha256), rows,
                  f"{len(parts)} file(s) re-checked", current.upload_seq, t.contract_sha256)
    except UploadRejected as exc:
        for table in built:
            _drop(conn, t.schema, table)
        outcome.revalidation_failed = f"the current version {current.version} breaks the changed contract: {exc}"
        outcome.revalidation_report = exc.report


def reprocess(conn: psycopg.Connection, t: Target, seq: int) -> Upload:
    """Re-load one accepted upload from its kept file (a backfill of its partition), as a new version."""
    with locked(conn, t):
        return _reprocess(conn, t, seq)


def _reprocess(conn: psycopg.Connection, t: Target, seq: int) -> Upload:
    upload = queue.get(conn, seq)
    current = current_version(conn, t)
    if upload is None or upload.dataset != t.dataset or upload.collaboration != t.collaboration:
        raise UploadRejected(f"no upload #{seq} of {t.collaboration}/{t.party}/{t.dataset}")
    if upload.state != "accepted" or current is None:
        raise UploadRejected(f"upload #{seq} ({upload.file_name}) is {upload.state}: {upload.reason or 'not part of the data'}")
    old = [p for p in current.parts if re.fullmatch(re.escape(t.dataset) + rf"__u{seq}(?:_r\d+)?", p)]
    if not old:
        raise UploadRejected(f"upload #{seq} ({upload.file_name}) is not part of the current version {current.version}")
    path = t.accepted_dir / upload.stored_name
    if not path.is_file():
        raise UploadRejected(f"upload #{seq}: its file is no longer under {t.accepted_dir}; upload it again")
    _kept_intact(upload, path)
    table = f"{t.dataset}__u{seq}_r{current.version + 1}"
    try:
        report, _, duplicates, dropped = _build_part(conn, t, path, upload.file_name, table)
        previous_rows = int(upload.row_count or 0)
        with conn.transaction():
            # The kept file was checked to be the accepted one: the content is the same, so is its checksum (a backfill of the
            # same file must not look like new data to the releases, which would draw and charge fresh noise).
            version = _swap(conn, t, tuple(table if p == old[0] else p for p in current.parts), current.checksum,
                            current.row_count - previous_rows + report.row_count, upload.file_name, current.upload_seq,
                            _contract_of(t, current, rechecked_all=len(current.parts) == 1))
            queue.decide(conn, seq, "accepted", None, version=version, row_count=report.row_count, duplicate_rows=duplicates, dropped_rows=dropped)
    except BaseException:
        _drop(conn, t.schema, table)
        raise
    done = queue.get(conn, seq)
    assert done is not None
    return done


def _kept_intact(upload: Upload, path: Path) -> None:
    """A kept file is the one that was accepted: its checksum is checked before it is read again (a backfill, a changed
    contract), so an edited or swapped file can never become the dataset under an old upload's name."""
    if upload.checksum is None:
        return
    now, _ = file_checksum(path)
    if now != upload.checksum:
        raise UploadRejected(f"the kept file of upload #{upload.seq} ({upload.file_name}) changed since it was accepted (SHA-256 {upload.checksum[:12]}..., "
                             f"now {now[:12]}...): it is not read again; restore it, or upload the data again")


def withdraw(conn: psycopg.Connection, t: Target, seq: int) -> Version:
    """Remove one appended file's rows (append mode): a new version without its table."""
    with locked(conn, t):
        return _withdraw(conn, t, seq)


def _withdraw(conn: psycopg.Connection, t: Target, seq: int) -> Version:
    if t.spec.mode != "append":
        raise UploadRejected(f"{t.dataset} is in replace mode: upload a corrected file instead of withdrawing one")
    upload = queue.get(conn, seq)
    current = current_version(conn, t)
    if upload is None or upload.dataset != t.dataset or upload.collaboration != t.collaboration or upload.party != t.party:
        raise UploadRejected(f"no upload #{seq} of {t.collaboration}/{t.party}/{t.dataset} (see `dcr uploads list {t.collaboration}`)")
    kept = tuple(p for p in (current.parts if current else ()) if not re.fullmatch(re.escape(t.dataset) + rf"__u{seq}(?:_r\d+)?", p))
    if upload.state != "accepted" or current is None or len(kept) == len(current.parts):
        raise UploadRejected(f"upload #{seq} ({upload.file_name}) is {upload.state}, not part of the current data: nothing to withdraw")
    if not kept:
        raise UploadRejected(f"upload #{seq} ({upload.file_name}) is the dataset's only file: a dataset cannot be emptied; upload its replacement first")
    # The rows the new version holds, counted (not the version's count less the file's: under `duplicates: drop` the two
    # need not add up, and a count that is wrong in the audit trail is worse than a count that costs a scan).
    rows = sum(int(conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(t.schema, p))).fetchone()[0]) for p in kept)  # type: ignore[index, misc]
    with conn.transaction():
        _swap(conn, t, kept, _chain(current.checksum, f"withdraw:{seq}"), rows,
              upload.file_name, current.upload_seq, current.contract_sha256)  # nothing was re-checked: the contract stays
        queue.decide(conn, seq, "withdrawn", f"{upload.file_name}: withdrawn by its party")
    source = t.accepted_dir / upload.stored_name
    target = t.folder("_withdrawn") / upload.stored_name
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.exists():
        source.replace(target)
    now = current_version(conn, t)
    assert now is not None
    return now


# --- one file into one typed, checked table ---------------------------------------------------------


def _build_part(conn: psycopg.Connection, t: Target, path: Path, name: str, table: str) -> tuple[ValidationReport, dict[str, float], int, int]:
    """Load, type, de-duplicate and validate ``path`` as ``schema.table``; raises UploadRejected (tables dropped by the caller)."""
    ds, schema = t.spec, t.schema
    load = f"{table}__l"
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
    try:
        try:
            _load(conn, path, name, ds, t.dataset, schema, load)
        except FileProblem as exc:
            raise UploadRejected(str(exc)) from None
        loaded = int(conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, load))).fetchone()[0])  # type: ignore[index]
        if loaded == 0:
            what = "a header but no data rows" if ds.format.type == "csv" else "no rows"
            raise UploadRejected(f"{name}: the file has {what}; send the export with its rows")
        _create_typed(conn, schema, table, load, ds, name)
    finally:
        conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, load)))
    extra_rows, extra = _duplicates(conn, schema, table, ds)
    dropped = 0
    if extra and ds.duplicates == "reject":
        rows = ", ".join(map(str, extra_rows)) + (", ..." if extra > len(extra_rows) else "")
        raise UploadRejected(f"{name}: {extra} row(s) repeat an earlier row exactly (rows {rows}); the dataset's policy says duplicates: reject")
    if extra and ds.duplicates == "drop":
        _drop_duplicates(conn, schema, table, ds)
        dropped = extra
    report = validate_table(sqlalchemy_url(t.database_url), schema, table, ds, t.dataset, t.tokenised)
    if ds.max_duplicate_fraction is not None:
        remaining = 0 if dropped else extra
        total = report.row_count or 1
        fraction = round(remaining / total, 6)
        rule = RuleOutcome("max_duplicate_fraction", None, fraction <= ds.max_duplicate_fraction, remaining,
                           () if dropped else tuple(extra_rows), fraction)
        report = ValidationReport((*report.outcomes, rule), report.row_count)
    if not report.success:
        lines = "; ".join(o.describe() for o in report.failures())
        raise UploadRejected(f"{name}: {len(report.failures())} rule(s) failed: {lines}", report)
    nulls = _null_fractions(conn, schema, table, ds)
    return ValidationReport(report.outcomes, report.row_count, nulls), nulls, extra, dropped


def _duplicates(conn: psycopg.Connection, schema: str, table: str, ds: Dataset) -> tuple[list[int], int]:
    """Row numbers (first few) and count of rows that repeat an earlier row exactly: extra copies, not originals."""
    columns = sql.SQL(", ").join(map(sql.Identifier, ds.columns))
    repeats = sql.SQL("select {n} from (select {n}, row_number() over (partition by {c} order by {n}) as copy from {t}) d where copy > 1").format(
        n=sql.Identifier(ROW_NUMBER), c=columns, t=sql.Identifier(schema, table))
    count = int(conn.execute(sql.SQL("select count(*) from ({}) r").format(repeats)).fetchone()[0])  # type: ignore[index]
    if not count:
        return [], 0
    rows = conn.execute(sql.SQL("{} order by 1 limit {}").format(repeats, sql.Literal(ROWS_IN_REPORT))).fetchall()
    return [int(r[0]) for r in rows], count


def _drop_duplicates(conn: psycopg.Connection, schema: str, table: str, ds: Dataset) -> None:
    columns = sql.SQL(", ").join(map(sql.Identifier, ds.columns))
    conn.execute(sql.SQL(
        "delete from {t} where {n} in (select {n} from (select {n}, row_number() over (partition by {c} order by {n}) as copy from {t}) d where copy > 1)"
    ).format(t=sql.Identifier(schema, table), n=sql.Identifier(ROW_NUMBER), c=columns))


def _null_fractions(conn: psycopg.Connection, schema: str, table: str, ds: Dataset) -> dict[str, float]:
    names = list(ds.columns)
    counts = sql.SQL(", ").join(sql.SQL("count({})").format(sql.Identifier(n)) for n in names)
    row = conn.execute(sql.SQL("select count(*), {} from {}").format(counts, sql.Identifier(schema, table))).fetchone()
    total = int(row[0]) or 1  # type: ignore[index]
    return {n: round(1 - int(c) / total, 6) for n, c in zip(names, row[1:], strict=False)}  # type: ignore[index]


# --- readers: every format becomes rows of text, streamed --------------------------------


def _first_line(blocks: Iterator[str], name: str) -> tuple[str, list[str]]:
    """The first line (the header) and the blocks read to find it."""
    seen: list[str] = []
    for block in blocks:
        seen.append(block)
        if "\n" in block:
            break
    text = "".join(seen)
    if not text.strip():
        raise UploadRejected(f"{name}: the file is empty; a header row and at least one data row are required")
    return text.split("\n", 1)[0], seen


def _csv_header(line: str, name: str, ds: Dataset) -> list[str]:
    header = next(csv.reader([line], delimiter=ds.format.delimiter, quotechar=ds.format.quote), None)
    if not header or not any(h.strip() for h in header):
        raise UploadRejected(f"{name}: line 1 (the header) is empty; a header row naming the columns is required")
    return [h.strip() for h in header]


def _parquet_file(path: Path, name: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(open_regular(path))
    except FileProblem as exc:
        raise UploadRejected(f"{name}: {str(exc).split(': ', 1)[-1]}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UploadRejected(f"{name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None


def _parquet_types(schema: Any, ds: Dataset, name: str) -> None:
    """Refuse a Parquet column whose type cannot hold the declared one (text is always cast and checked later)."""
    import pyarrow as pa

    t = pa.types
    fits = {
        ColumnType.INTEGER: lambda a: t.is_integer(a),
        ColumnType.NUMERIC: lambda a: t.is_integer(a) or t.is_floating(a) or t.is_decimal(a),
        ColumnType.DATE: lambda a: t.is_date(a) or t.is_timestamp(a),
        ColumnType.TIMESTAMP: lambda a: t.is_timestamp(a) or t.is_date(a),
        ColumnType.BOOLEAN: lambda a: t.is_boolean(a),
        ColumnType.TEXT: lambda a: not (t.is_nested(a) or t.is_binary(a) or t.is_large_binary(a)),
    }
    for column, spec in ds.columns.items():
        if column not in schema.names:
            continue
        arrow = schema.field(column).type
        if t.is_null(arrow) or t.is_string(arrow) or t.is_large_string(arrow):
            continue  # text is cast into the declared type and checked, row by row
        if not fits[spec.type](arrow):
            raise UploadRejected(f"{name}: column {column} is {arrow} in the Parquet file, but the contract declares {spec.type.value}; "
                                 "convert the column before exporting, or correct the contract")


def _jsonl_rows(blocks: Iterator[str], name: str) -> Iterator[dict[str, Any]]:
    number = 0
    for block in blocks:
        for line in block.splitlines():
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UploadRejected(f"{name}: line {number} is not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UploadRejected(f"{name}: line {number} is not a JSON object")
            yield record


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _check_header(name: str, header: list[str], ds: Dataset, dataset_name: str) -> None:
    missing = [c for c in ds.columns if c not in header]
    if missing:
        raise UploadRejected(f"{name}: missing column(s) {', '.join(missing)} (declared in the policy for {dataset_name})")
    unknown = [h for h in header if h not in ds.columns]
    if unknown and ds.unknown_columns == "reject":
        raise UploadRejected(f"{name}: unknown column(s) {', '.join(unknown)} (dataset {dataset_name} rejects undeclared columns)")
    if len(set(header)) != len(header):
        raise UploadRejected(f"{name}: duplicate column names in the header")


def _copy_error(exc: psycopg.Error, name: str) -> str:
    """A COPY failure without the offending value (it may be an identifier)."""
    context = exc.diag.context or ""
    where = re.search(r"line (\d+)(?:, column (\w+))?", context)
    reason = (exc.diag.message_primary or str(exc)).split(":")[0]
    if where:
        column = f", column {where.group(2)}" if where.group(2) else ""
        # COPY counts the header as line 1; reports count data rows from 1.
        return f"{name}: row {int(where.group(1)) - 1}{column}: {reason}"
    return f"{name}: {reason}"


def _load(conn: psycopg.Connection, path: Path, name: str, ds: Dataset, dataset_name: str, schema: str, load: str) -> None:
    """Stream the file into ``schema.load`` (text columns + dcr_line)."""
    fmt = ds.format.type
    blocks: Iterator[str] = iter(())
    records: Iterator[dict[str, Any]] = iter(())
    if fmt == "csv":
        blocks = text_lines_blocks(path, ds.format.encoding, name)
        line, seen = _first_line(blocks, name)
        header = _csv_header(line, name, ds)
        blocks = _chain_blocks(seen, blocks)
    elif fmt == "parquet":
        parquet = _parquet_file(path, name)
        header = [f.name for f in parquet.schema_arrow]
        _parquet_types(parquet.schema_arrow, ds, name)
    else:
        records = _jsonl_rows(text_lines_blocks(path, ds.format.encoding, name), name)
        first = next(records, None)
        if first is None:
            raise UploadRejected(f"{name}: the file is empty; one JSON object per line is required")
        header = list(first)
        records = _chain_records(first, records)
    _check_header(name, header, ds, dataset_name)
    table = sql.Identifier(schema, load)
    text_columns = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(h)) for h in header)
    conn.execute(sql.SQL("drop table if exists {}").format(table))
    conn.execute(sql.SQL("create unlogged table {} ({} bigserial, {})").format(table, sql.Identifier(ROW_NUMBER), text_columns))
    columns = sql.SQL(", ").join(map(sql.Identifier, header))
    try:
        if fmt == "csv":
            copy_sql = sql.SQL("copy {} ({}) from stdin with (format csv, header true, delimiter {}, quote {}, encoding 'UTF8')").format(
                table, columns, sql.Literal(ds.format.delimiter), sql.Literal(ds.format.quote),
            )
            with conn.cursor().copy(copy_sql) as copy:
                for block in blocks:
                    copy.write(block.encode("utf-8"))
            return
        with conn.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(table, columns)) as copy:
            if fmt == "parquet":
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                    for row in zip(*(batch.column(h).to_pylist() for h in header), strict=False):
                        copy.write_row([_text(v) for v in row])
            else:
                for record in records:
                    copy.write_row([_text(record.get(h)) for h in header])
    except (psycopg.errors.DataError, psycopg.errors.BadCopyFileFormat) as exc:
        raise UploadRejected(_copy_error(exc, name)) from None
    except (UploadRejected, FileProblem):
        raise
    except OSError as exc:  # pyarrow reports a truncated file while reading batches
        if fmt != "parquet":
            raise
        raise UploadRejected(f"{name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None
    except Exception as exc:
        if type(exc).__module__.startswith("pyarrow"):
            raise UploadRejected(f"{name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None
        raise


def _chain_blocks(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _chain_records(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest


def _create_typed(conn: psycopg.Connection, schema: str, table: str, load: str, ds: Dataset, name: str) -> None:
    """Cast the text load into the declared types; on failure, name the first bad row and column."""
    casts = sql.SQL(", ").join(
        sql.SQL("cast(nullif(btrim({c}), '') as {t}) as {c}").format(c=sql.Identifier(n), t=sql.SQL(col.type.sql))
        if col.type.sql != "text"
        else sql.SQL("{c}").format(c=sql.Identifier(n))
        for n, col in ds.columns.items()
    )
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, table)))
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("create table {} as select {}, {} from {} order by {}").format(
                    sql.Identifier(schema, table), sql.Identifier(ROW_NUMBER), casts, sql.Identifier(schema, load), sql.Identifier(ROW_NUMBER)
                )
            )
    except psycopg.errors.DataError:
        raise UploadRejected(f"{name}: {_first_bad_value(conn, schema, load, ds)}") from None


def _first_bad_value(conn: psycopg.Connection, schema: str, load: str, ds: Dataset) -> str:
    """Which row and column broke the cast (never the value: it may be an identifier)."""
    if conn.info.server_version >= 160000:
        check = "pg_input_is_valid(btrim({c}), {t})"
    else:  # PostgreSQL 15 and MPP dialects: a temporary PL/pgSQL probe (core language, no extension)
        conn.execute(
            "create or replace function pg_temp.dcr_input_is_valid(v text, t text) returns boolean language plpgsql as $$ "
            "begin execute format('select cast(%L as %s)', v, t); return true; exception when others then return false; end $$"
        )
        check = "pg_temp.dcr_input_is_valid(btrim({c}), {t})"
    for column, col in ds.columns.items():
        if col.type.sql == "text":
            continue
        predicate = sql.SQL(check).format(c=sql.Identifier(column), t=sql.Literal(col.type.sql))
        bad = conn.execute(
            sql.SQL("select {} from {} where nullif(btrim({}), '') is not null and not {} order by 1 limit 1").format(
                sql.Identifier(ROW_NUMBER), sql.Identifier(schema, load), sql.Identifier(column), predicate
            )
        ).fetchone()
        if bad is not None:
            return f"row {bad[0]}: column {column} is not a valid {col.type.value}"
    return "a value does not match its declared type"

