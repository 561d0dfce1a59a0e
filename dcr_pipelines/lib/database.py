"""The PostgreSQL the clean room runs on: embedded (pgserver) unless DCR_DATABASE_URL is set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import psycopg
from psycopg import sql

WAREHOUSE_DB = "dcr"
DAGSTER_DB = "dagster"


@dataclass(frozen=True)
class Connection:
    """libpq connection parameters, as dbt's profile and Dagster's storage need them."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    @classmethod
    def from_url(cls, url: str) -> Connection:
        parsed = urlparse(url)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL (postgresql://...): scheme {parsed.scheme!r}")
        query = parse_qs(parsed.query)
        host = query.get("host", [parsed.hostname or "localhost"])[0]
        return cls(
            host=host,
            port=int(query.get("port", [parsed.port or 5432])[0]),
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            dbname=(parsed.path or "/").lstrip("/") or "postgres",
        )

    def url(self, dbname: str | None = None) -> str:
        """A URL both psycopg and SQLAlchemy (dagster-postgres) accept; sockets go in ``?host=``."""
        auth = self.user + (f":{self.password}" if self.password else "")
        name = dbname or self.dbname
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{name}?host={self.host}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{name}"

    def redacted(self) -> str:
        return self.url().replace(f":{self.password}@", ":***@") if self.password else self.url()


class EmbeddedServerError(RuntimeError):
    """The embedded PostgreSQL could not be started, or a database cannot be reached (one sentence: cause and fix)."""


def check_reachable(conn: Connection, what: str = "DCR_DATABASE_URL", timeout: int = 5) -> None:
    """Connect once with a short timeout; raise :class:`EmbeddedServerError` naming the cause and the fix."""
    try:
        psycopg.connect(conn.url(), connect_timeout=timeout, autocommit=True).close()
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        text = first.split("failed: ")[-1].replace("FATAL:", "").strip()
        where = f"{conn.host or 'localhost'}:{conn.port}"
        if "does not exist" in text:
            fix = f"create it (createdb -h {conn.host} -p {conn.port} {conn.dbname}) or correct {what}"
        elif "password" in text or "authentication" in text:
            fix = f"check the user and password in {what}"
        elif "timeout" in text.lower():
            fix = f"check that the server at {where} is up and reachable from here, or correct {what}"
        else:
            fix = f"start the database server at {where}, or correct {what}"
        raise EmbeddedServerError(f"cannot connect to the database {conn.dbname!r} at {where}: {text}; {fix}") from None


@contextmanager
def _without_secrets() -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("DCR_SECRET__")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def start_embedded(home: Path, wait_seconds: float = 15.0) -> Connection:
    """Start (or reuse) the embedded PostgreSQL 16 under ``home/pg``; it outlives this process.

    If the data folder was removed while a server still ran, that orphan
    keeps its lock until it notices; wait for it rather than fail at once.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver  # imported late: only the embedded path needs it

        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                with _without_secrets():  # the server (and any server-side read of its environment) never holds a key
                    pgserver.get_server(str(home / "pg"), cleanup_mode=None)
                break
            except subprocess.CalledProcessError as exc:
                detail = ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")).strip()
                last = detail.splitlines()[-1] if detail else f"{Path(str(exc.cmd[0])).name if exc.cmd else 'pg_ctl'} exited with {exc.returncode}"
                free = shutil.disk_usage(home).free
                hint = (f"only {free // (1 << 20)} MB are free under {home}: free space there" if free < (256 << 20)
                        else f"see {home / 'pg' / 'log'}, or `dcr db stop` and retry")
                raise EmbeddedServerError(f"the embedded PostgreSQL under {home / 'pg'} did not start ({last}); {hint}") from None
            except AssertionError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"the embedded PostgreSQL under {home / 'pg'} did not start: an earlier server is still running "
                        "(was .dcr/ removed while it ran?). Stop it with `dcr db stop`, or wait a minute and retry."
                    ) from None
                time.sleep(1)
        # From postmaster.pid, not the server object: pgserver keeps the info of the start it saw in this process.
        info = _postmaster(home)
        if listening(home) is not None and not info.hostname:  # asked to listen on TCP, and started without it (pgserver's start)
            info = _restart_listening(home, info)
    conn = Connection.from_url(info.get_uri())
    return replace(conn, port=info.port) if info.port else conn


# --- TCP for member logins ------------------------------------------------------------------------------------------
# The embedded server listens on a Unix socket only (trust: the operator's processes). `dcr db listen` asks it to
# listen on TCP too, for member logins (`dcr member add`): the request is a file in the home, honoured at every start,
# and pg_hba.conf admits over TCP only members of the group dcr_member_logins, to the warehouse database, with
# SCRAM-SHA-256 passwords; every other TCP connection is rejected (the operator and the dbt login included).

LISTEN_FILE = "pg_listen.json"
MEMBER_GROUP = "dcr_member_logins"


def listening(home: Path) -> tuple[str, int] | None:
    """(host, port) the embedded server was asked to listen on for member logins, or None (socket only)."""
    path = home / LISTEN_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return str(data["host"]), int(data["port"])


def hba_rules() -> str:
    return (
        "# Written by dcr (lib/database.py): the operator on the socket; member logins over TCP, nobody else.\n"
        "local all all trust\n"
        f"host {WAREHOUSE_DB} +{MEMBER_GROUP} 0.0.0.0/0 scram-sha-256\n"
        f"host {WAREHOUSE_DB} +{MEMBER_GROUP} ::/0 scram-sha-256\n"
        "host all all 0.0.0.0/0 reject\n"
        "host all all ::/0 reject\n"
    )


def listen(home: Path, host: str | None, port: int | None) -> None:
    """Ask the embedded server to listen on ``host:port`` for member logins (None: the socket only again) and restart it
    so if it does not already (running commands lose their connections; the socket's port is the TCP port)."""
    path = home / LISTEN_FILE
    home.mkdir(parents=True, exist_ok=True)
    if host is None or port is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({"host": host, "port": port}) + "\n", encoding="utf-8")
    start_embedded(home)
    info = _postmaster(home)
    if (info.hostname or None, info.port or 5432) != (host, port or 5432):
        _restart_listening(home, info)


def _postmaster(home: Path) -> Any:
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(home / "pg")
    if info is None:
        raise EmbeddedServerError(f"the embedded PostgreSQL under {home / 'pg'} is not running; `dcr db url` starts it")
    return info


def _restart_listening(home: Path, info: Any) -> Any:
    """Restart the embedded server with the listening ``home`` asks for (pg_hba.conf rewritten first); its new postmaster info."""
    import pgserver

    pgdata = home / "pg"
    wanted = listening(home)
    hba = pgdata / "pg_hba.conf"
    owner = pgdata.stat()
    hba.write_text(hba_rules(), encoding="utf-8")
    os.chown(hba, owner.st_uid, owner.st_gid)
    socket_dir = info.socket_dir or pgdata
    options = [f'-h "{wanted[0]}"' if wanted else '-h ""', f"-p {wanted[1] if wanted else 5432}", f"-k {socket_dir}"]
    bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs the server as this user when started by root
    args = [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "-l", str(pgdata / "log"), "restart"]
    for option in options:
        args += ["-o", option]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, user=user, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        where = f"{wanted[0]}:{wanted[1]}" if wanted else "the socket only"
        raise EmbeddedServerError(f"the embedded PostgreSQL under {pgdata} did not restart listening on {where} "
                                  f"({detail[-1] if detail else done.returncode}); see {pgdata / 'log'}: if the port is taken, "
                                  "`dcr db listen --port` another one")
    return _postmaster(home)


def stop_embedded(home: Path, timeout: float = 10.0) -> bool:
    """Fast-shutdown the embedded server of ``home`` if it runs; True if one was stopped."""
    pid_file = home / "pg" / "postmaster.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().splitlines()[0])
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def ensure_database(admin: Connection, dbname: str) -> None:
    """Create ``dbname`` if it does not exist (idempotent; safe under concurrent callers)."""
    with psycopg.connect(admin.url("postgres"), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone()
        if not exists:
            with suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(dbname)))


@contextmanager
def connect(url: str, *, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    with psycopg.connect(url, autocommit=autocommit) as conn:
        yield conn


@contextmanager
def advisory_lock(url: str, name: str) -> Iterator[None]:
    """Hold PostgreSQL's session-level advisory lock ``name`` while the block runs (other processes wait).

    The lock lives on a connection of its own, so it spans transactions and
    child processes (dbt); if this process dies, the server drops the
    connection and the lock with it.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(hashtext(%s))", (name,))
        try:
            yield
        finally:
            conn.execute("select pg_advisory_unlock(hashtext(%s))", (name,))
