"""Member requests as rows (migration ``meta/0004``): a member's login submits, the operator's Dagster answers.

Member side (a member login's connection): :func:`submit` calls ``dcr_meta.submit_request``, which takes the member
from ``session_user``; :func:`wait` polls the row (row-level security: a login sees its own rows only) until it is
answered, refused or failed.

Operator side: :func:`pending` lists what the request sensor has not launched yet; the run that does the work marks
the row :func:`launched`, then :func:`finish` writes the answer (or the refusal, or the failure) into it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import migrations

KINDS = ("query_run", "query_check", "release", "budget", "upload", "approve", "report")
CHUNK = 1 << 20  # bytes per upload chunk
DONE = ("answered", "refused", "failed")


@dataclass(frozen=True)
class Request:
    id: int
    collaboration: str
    member: str
    kind: str
    payload: dict[str, Any]
    state: str
    run_id: str | None
    answer: dict[str, Any] | None
    reason: str | None
    asked_at: datetime
    answered_at: datetime | None
    login: str = ""


MALFORMED = "_malformed"  # the payload key a request whose payload could not be read gets instead of it


def _json(text: str | None) -> Any:
    """A member's JSON, read defensively: one unreadable row (too deep for the reader, say) must not stop the others."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {MALFORMED: True}
    return value if isinstance(value, dict) else {MALFORMED: True}


def _request(row: Any, login: str = "") -> Request:
    return Request(id=row[0], collaboration=row[1], member=row[2], kind=row[3], payload=_json(row[4]) or {}, state=row[5], run_id=row[6],
                   answer=_json(row[7]), reason=row[8], asked_at=row[9], answered_at=row[10], login=login)


# Payloads and answers are read as text and parsed here (psycopg's jsonb reader would raise on the first deep one).
_COLUMNS = "id, collaboration, member, kind, payload::text, state, run_id, answer::text, reason, asked_at, answered_at"


# --- member side ----------------------------------------------------------------------------------------------------

class RequestError(Exception):
    """The request could not be made or was not answered in time (one sentence)."""


class Unreachable(RequestError):
    """The member's login could not connect."""


class Busy(RequestError):
    """Another process answers this collaboration's requests (`dcr serve` runs once per collaboration)."""


def ask(url: str, collab: str, kind: str, payload: dict[str, Any], timeout_s: float, progress: Callable[[Request], None] | None = None,
        note: Callable[[str], None] | None = None) -> Request:
    """Connect as the member login of ``url``, submit, and wait for the answer."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="dcr-member") as conn:
            return wait(conn, submit(conn, collab, kind, payload), timeout_s, progress, note=note)
    except psycopg.OperationalError as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split("failed: ")[-1].replace("FATAL:", "").strip()
        raise Unreachable(f"cannot reach the clean room with these credentials: {text}; check the URL and the password (the operator "
                          "makes a new one with `dcr member rotate`), and that the operator's database accepts members (`dcr db listen`)") from None


def send_file(url: str, collab: str, dataset: str, path: Path, timeout_s: float,
              progress: Callable[[Request], None] | None = None, note: Callable[[str], None] | None = None) -> Request:
    """Stream ``path`` in chunks as the member login of ``url``, then ask for it as an upload of ``dataset``; the answer."""
    token = uuid.uuid4()
    digest, size, seq = hashlib.sha256(), 0, 0
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="dcr-member") as conn:
            with path.open("rb") as handle, conn.pipeline():
                while block := handle.read(CHUNK):
                    digest.update(block)
                    size += len(block)
                    conn.execute("select dcr_meta.upload_chunk(%s, %s, %s)", (token, seq, block))
                    seq += 1
            payload = {"dataset": dataset, "file_name": path.name, "token": str(token), "chunks": seq, "size": size, "sha256": digest.hexdigest()}
            return wait(conn, submit(conn, collab, "upload", payload), timeout_s, progress, note=note)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise RequestError(f"{exc.diag.message_primary or exc}; check your credentials") from None
    except psycopg.OperationalError as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split("failed: ")[-1].replace("FATAL:", "").strip()
        raise Unreachable(f"cannot reach the clean room with these credentials: {text}; nothing was uploaded") from None


def submit(conn: psycopg.Connection, collab: str, kind: str, payload: dict[str, Any]) -> int:
    try:
        row = conn.execute("select dcr_meta.submit_request(%s, %s, %s)", (collab, kind, Jsonb(payload))).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise RequestError(f"{exc.diag.message_primary or exc}; check the collaboration name and your credentials") from None
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.ConfigurationLimitExceeded) as exc:
        raise RequestError(exc.diag.message_primary or str(exc)) from None
    except psycopg.errors.UndefinedFunction:
        raise RequestError("this database has no member requests (the operator's deployment predates them, or this is "
                           "not a clean-room database)") from None
    assert row is not None
    return int(row[0])


def get(conn: psycopg.Connection, request_id: int) -> Request | None:
    row = conn.execute(f"select {_COLUMNS} from dcr_meta.member_requests where id = %s", (request_id,)).fetchone()
    return _request(row) if row else None


NOTE_AFTER_S = 15.0


def wait(conn: psycopg.Connection, request_id: int, timeout_s: float, progress: Callable[[Request], None] | None = None,
         interval_s: float = 0.1, note: Callable[[str], None] | None = None) -> Request:
    """Poll until the request is done (its answer, refusal or failure); RequestError after ``timeout_s``. ``note`` is
    told once when it has waited :data:`NOTE_AFTER_S` without being picked up."""
    started = time.monotonic()
    deadline = started + timeout_s
    seen, noted = "", False
    while True:
        request = get(conn, request_id)
        if request is None:
            raise RequestError(f"request #{request_id} is not yours or does not exist")
        if request.state in DONE:
            return request
        if progress is not None and request.state != seen:
            progress(request)
            seen = request.state
        if not noted and request.state == "pending" and time.monotonic() - started > NOTE_AFTER_S and note is not None:
            note(f"request #{request_id} is still waiting after {NOTE_AFTER_S:.0f} s: the operator's request sensor (or `dcr serve`) "
                 f"may not be running; waiting up to {timeout_s:.0f} s")
            noted = True
        if time.monotonic() > deadline:
            raise RequestError(f"request #{request_id} is still {request.state} after {timeout_s:.0f} s: the operator's request sensor "
                               "(or `dcr serve`) may not be running; ask the operator, then wait for it with the same command")
        time.sleep(interval_s)
        interval_s = min(interval_s * 1.5, 1.0)  # quick for a cached answer, then at most once a second


# --- operator side --------------------------------------------------------------------------------------------------

@contextmanager
def listening(url: str, collab: str | None = None) -> Iterator[Callable[[float], None]]:
    """A function that waits until a request is submitted (the submit function's notification) or ``timeout`` passes.
    With ``collab``: the one answerer of that collaboration in this process (a session lock, gone with the process;
    :class:`Busy` if another process holds it)."""
    with psycopg.connect(url, autocommit=True) as listener:
        if collab is not None and not listener.execute("select pg_try_advisory_lock(hashtext(%s))", (f"dcr-serve:{collab}",)).fetchone()[0]:  # type: ignore[index]
            raise Busy(f"another `dcr serve {collab}` answers {collab}'s member requests already (stop it first, or let it answer)")
        listener.execute("listen dcr_member_requests")

        def wait(timeout: float) -> None:
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                pass

        yield wait


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


def ensure(conn: psycopg.Connection) -> None:
    migrations.ensure(conn, "meta")


def pending(conn: psycopg.Connection, collab: str, after: int = 0, limit: int = 50) -> list[Request]:
    """Requests of ``collab`` not launched yet, oldest first, with ids above ``after`` (the sensor's cursor)."""
    ensure(conn)
    rows = conn.execute(f"select {_COLUMNS}, login from dcr_meta.member_requests where collaboration = %s and state = 'pending' "
                        "and id > %s order by id limit %s", (collab, after, limit)).fetchall()
    return [_request(r[:-1], r[-1]) for r in rows]


def unfinished(conn: psycopg.Connection, collab: str) -> list[Request]:
    ensure(conn)
    rows = conn.execute(f"select {_COLUMNS}, login from dcr_meta.member_requests where collaboration = %s "
                        "and state in ('pending', 'launched') order by id", (collab,)).fetchall()
    return [_request(r[:-1], r[-1]) for r in rows]


def claim(conn: psycopg.Connection, request_id: int, collab: str, kind: str, run_id: str) -> Request:
    """The run doing request ``request_id`` takes it (pending -> launched, once); the row as the member wrote it."""
    ensure(conn)
    row = conn.execute(f"update dcr_meta.member_requests set state = 'launched', run_id = %s where id = %s and collaboration = %s "
                       f"and kind = %s and state = 'pending' returning {_COLUMNS}, login", (run_id, request_id, collab, kind)).fetchone()
    if row is None:
        raise LookupError(f"request #{request_id} is no pending {kind} request of {collab}")
    return _request(row[:-1], row[-1])


def finish(conn: psycopg.Connection, request_id: int, state: str, *, answer: dict[str, Any] | None = None, reason: str | None = None,
           run_id: str | None = None) -> None:
    assert state in DONE
    conn.execute("update dcr_meta.member_requests set state = %s, answer = %s, reason = %s, run_id = coalesce(%s, run_id), "
                 "answered_at = now() where id = %s and state in ('pending', 'launched')",
                 (state, Jsonb(json.loads(json.dumps(answer, default=str))) if answer is not None else None, reason, run_id, request_id))


def for_member(conn: psycopg.Connection, collab: str, member: str, limit: int = 100) -> list[Request]:
    """The operator's view of one member's requests (newest first)."""
    ensure(conn)
    rows = conn.execute(f"select {_COLUMNS}, login from dcr_meta.member_requests where collaboration = %s and member = %s "
                        "order by id desc limit %s", (collab, member, limit)).fetchall()
    return [_request(r[:-1], r[-1]) for r in rows]


def assemble(conn: psycopg.Connection, request: Request, into: Path) -> Path:
    """The file of an upload request, from the chunks its own login streamed under its token (checked against the size and
    SHA-256 the request states), written to ``into``/file name; the chunks are deleted. ValueError names what is wrong."""
    payload = request.payload
    token, chunks = str(payload.get("token") or ""), payload.get("chunks")
    name = Path(str(payload.get("file_name") or "upload")).name
    if len(name.encode()) > 200:
        raise ValueError(f"the file name is {len(name.encode())} bytes long; at most 200 (rename the file)")
    target = into / name
    digest, size, seen = hashlib.sha256(), 0, 0
    try:
        with conn.transaction(), target.open("wb") as out, conn.cursor(name=f"chunks_{request.id}") as cur:
            cur.execute("select seq, data from dcr_meta.member_upload_chunks where token = %s::uuid and login = %s order by seq", (token, request.login))
            for seq, data in cur:
                if seq != seen:
                    raise ValueError(f"chunk {seen} of the upload is missing")
                out.write(data)
                digest.update(data)
                size += len(data)
                seen += 1
    except psycopg.errors.InvalidTextRepresentation:
        raise ValueError("the upload's token is not a UUID") from None
    except OSError as exc:
        raise ValueError(f"the file could not be written as {name!r} ({exc.strerror or exc}); rename it") from None
    if seen != chunks or size != payload.get("size") or digest.hexdigest() != payload.get("sha256"):
        raise ValueError(f"the upload arrived incomplete or changed ({seen} of {chunks} chunks, {size} bytes): send it again")
    conn.execute("delete from dcr_meta.member_upload_chunks where token = %s::uuid and login = %s", (token, request.login))
    return target


def take(conn: psycopg.Connection, request_id: int) -> bool:
    """Take a pending request for the work done outside a run (an upload's landing): once, whoever ticks first."""
    return conn.execute("update dcr_meta.member_requests set state = 'launched' where id = %s and state = 'pending'", (request_id,)).rowcount == 1


def mark_landed(conn: psycopg.Connection, request_id: int, upload_seq: int) -> None:
    conn.execute("update dcr_meta.member_requests set answer = %s where id = %s and state = 'launched'", (Jsonb({"upload": upload_seq}), request_id))


def launched_uploads(conn: psycopg.Connection, collab: str) -> list[Request]:
    rows = conn.execute(f"select {_COLUMNS}, login from dcr_meta.member_requests where collaboration = %s and kind = 'upload' "
                        "and state = 'launched' order by id", (collab,)).fetchall()
    return [_request(r[:-1], r[-1]) for r in rows]


def drop_stale_chunks(conn: psycopg.Connection, older_than_hours: int = 24) -> int:
    """Chunks no request took (a client that died mid-upload) are deleted after a day."""
    return conn.execute("delete from dcr_meta.member_upload_chunks where written_at < now() - make_interval(hours => %s)",
                        (older_than_hours,)).rowcount


def drop_chunks(conn: psycopg.Connection, request: Request) -> None:
    """The chunks of a refused upload request go at once."""
    with suppress(psycopg.errors.InvalidTextRepresentation):
        conn.execute("delete from dcr_meta.member_upload_chunks where token = %s::uuid and login = %s", (str(request.payload.get("token")), request.login))
