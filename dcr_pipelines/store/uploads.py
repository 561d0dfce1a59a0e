"""The upload queue's records (``dcr_meta.uploads``): one row per file, from the moment it is claimed.

States: ``queued`` (claimed, waiting) -> ``processing`` (a run is loading it;
``attempts`` counts tries) -> ``accepted`` (it is, or was, part of a version),
``duplicate`` (its content is already loaded), ``stale`` (a later upload is
already current: it would roll data back), ``superseded`` (a later upload
was waiting too; replace mode loads the newest), ``quarantined`` (the file is
bad; ``reason`` says why), ``withdrawn`` (append mode: its rows were removed).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import psycopg

from . import migrations

TERMINAL = ("accepted", "duplicate", "stale", "superseded", "quarantined", "withdrawn")
_COLUMNS = ("seq", "collaboration", "party", "dataset", "file_name", "checksum", "size_bytes", "state", "reason", "attempts",
            "version", "row_count", "duplicate_rows", "dropped_rows", "landed_at", "decided_at")


@dataclass(frozen=True)
class Upload:
    seq: int
    collaboration: str
    party: str
    dataset: str
    file_name: str
    checksum: str | None
    size_bytes: int | None
    state: str
    reason: str | None
    attempts: int
    version: int | None
    row_count: int | None
    duplicate_rows: int | None
    dropped_rows: int | None
    landed_at: dt.datetime
    decided_at: dt.datetime | None

    @property
    def stored_name(self) -> str:
        return stored_name(self.seq, self.file_name)

    @property
    def partition_key(self) -> str:
        return partition_key(self.seq)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in self.__dict__.items()}


def stored_name(seq: int, file_name: str) -> str:
    """The queue's name for an upload: its arrival sequence, then the name its party gave it."""
    return f"{seq:08d}__{file_name}"


def partition_key(seq: int) -> str:
    return f"upload-{seq:08d}"


_STORED = re.compile(r"^(\d{8,})__(.+)$")


def parse_stored_name(name: str) -> tuple[int, str] | None:
    found = _STORED.match(name)
    return (int(found.group(1)), found.group(2)) if found else None


def seq_of_partition(key: str) -> int | None:
    return int(key.removeprefix("upload-")) if re.fullmatch(r"upload-\d{8,}", key) else None


def next_seq(conn: psycopg.Connection) -> int:
    migrations.ensure(conn, "meta")
    return int(conn.execute("select nextval('dcr_meta.upload_seq')").fetchone()[0])  # type: ignore[index]


def register(conn: psycopg.Connection, seq: int, collab: str, party: str, dataset: str, file_name: str, *, checksum: str | None,
             size_bytes: int | None, state: str = "queued", reason: str | None = None) -> Upload:
    migrations.ensure(conn, "meta")
    conn.execute(
        "insert into dcr_meta.uploads (seq, collaboration, party, dataset, file_name, checksum, size_bytes, state, reason, decided_at) "
        "values (%s, %s, %s, %s, %s, %s, %s, %s, %s, case when %s = 'queued' then null else now() end) on conflict (seq) do nothing",
        (seq, collab, party, dataset, file_name, checksum, size_bytes, state, reason, state),
    )
    found = get(conn, seq)
    assert found is not None
    return found


def get(conn: psycopg.Connection, seq: int) -> Upload | None:
    migrations.ensure(conn, "meta")
    row = conn.execute(f"select {', '.join(_COLUMNS)} from dcr_meta.uploads where seq = %s", (seq,)).fetchone()
    return Upload(*row) if row else None


def listing(conn: psycopg.Connection, collab: str, party: str | None = None, dataset: str | None = None, *,
            states: tuple[str, ...] | None = None, limit: int = 1000) -> list[Upload]:
    """Uploads of a collaboration (optionally one party's dataset), oldest first."""
    migrations.ensure(conn, "meta")
    rows = conn.execute(
        f"select {', '.join(_COLUMNS)} from dcr_meta.uploads where collaboration = %s "
        "and (%s::text is null or party = %s) and (%s::text is null or dataset = %s) and (%s::text[] is null or state = any(%s)) "
        "order by seq desc limit %s",
        (collab, party, party, dataset, dataset, list(states) if states else None, list(states) if states else None, limit),
    ).fetchall()
    return [Upload(*r) for r in reversed(rows)]


def pending(conn: psycopg.Connection, collab: str, party: str, dataset: str) -> list[Upload]:
    return listing(conn, collab, party, dataset, states=("queued", "processing"))


def begin(conn: psycopg.Connection, seq: int, checksum: str, size_bytes: int) -> Upload:
    """Mark an upload as being processed (one more attempt); committed at once, so a crash leaves the count."""
    conn.execute("update dcr_meta.uploads set state = 'processing', attempts = attempts + 1, checksum = %s, size_bytes = %s where seq = %s",
                 (checksum, size_bytes, seq))
    found = get(conn, seq)
    assert found is not None
    return found


def requeue(conn: psycopg.Connection, seq: int, reason: str) -> None:
    """Put a processing upload back in the queue after a failure that was not its own (the attempt does not count)."""
    conn.execute("update dcr_meta.uploads set state = 'queued', attempts = greatest(attempts - 1, 0), reason = %s where seq = %s and state = 'processing'",
                 (reason, seq))


def decide(conn: psycopg.Connection, seq: int, state: str, reason: str | None = None, **fields: Any) -> None:
    """Move an upload to a terminal state (in the caller's transaction: with the version swap, for ``accepted``)."""
    assert state in TERMINAL, state
    allowed = {"version", "row_count", "duplicate_rows", "dropped_rows", "checksum", "size_bytes"}
    assert set(fields) <= allowed, fields
    sets = "".join(f", {k} = %({k})s" for k in fields)
    conn.execute(f"update dcr_meta.uploads set state = %(state)s, reason = %(reason)s, decided_at = now(){sets} where seq = %(seq)s",
                 {"state": state, "reason": reason, "seq": seq, **fields})


def set_reason(conn: psycopg.Connection, seq: int, reason: str) -> None:
    conn.execute("update dcr_meta.uploads set reason = %s where seq = %s", (reason, seq))
