"""Member logins: one PostgreSQL LOGIN role per member of a collaboration, made by the operator (`dcr member add`).

A member login is ``dcr_<collab>_<member>_member``. It has no attribute but LOGIN and a connection limit, its
password is stored as a SCRAM-SHA-256 verifier computed here (the password itself never reaches the server or its
logs), and it is granted exactly:

- ``dcr_<collab>_<member>_result_reader`` when the member receives results: the released results of the queries it
  receives and its own ad-hoc answers (``store.access``);
- ``dcr_member_logins``, a group with no privilege of its own: pg_hba admits its members over TCP, and it may call
  ``dcr_meta.submit_request`` and read its own rows of ``dcr_meta.member_requests`` (row-level security on
  ``session_user``; migration ``meta/0004``).

Nothing else: no raw, staging, matching or pre-noise table, no ledger, no other member's answers, no key, no Dagster
storage. ``dcr_meta.member_logins`` is the mapping from login to member: a login's identity is that row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from ..lib.database import MEMBER_GROUP
from ..lib.policy import LoadedCollaboration
from ..lib.policy.models import Ability
from . import access, migrations

SCRAM_ITERATIONS = 4096


class MemberError(Exception):
    """A member-login command that cannot be done (one sentence: cause and fix)."""


@dataclass(frozen=True)
class MemberLogin:
    login: str
    collaboration: str
    member: str
    created_at: datetime
    rotated_at: datetime | None


def login_name(collab: str, member: str) -> str:
    return access.role_name(collab, member, "member")


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802 / 7677; what ``\\password`` sends)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def ensure(conn: psycopg.Connection) -> None:
    migrations.ensure(conn, "meta")


def _groups(loaded: LoadedCollaboration, member: str) -> list[str]:
    spec = loaded.collaboration.members[member]
    reader = access.role_name(loaded.name, member, "result_reader")
    return [reader] if member in loaded.parties() or Ability.RECEIVE_RESULTS in spec.abilities else []


def add(conn: psycopg.Connection, loaded: LoadedCollaboration, member: str) -> tuple[str, str]:
    """Create ``member``'s login (and the collaboration's roles if they are not there yet); (login, password)."""
    if member not in loaded.collaboration.members:
        raise MemberError(f"{loaded.name} has no member {member!r} (members: {', '.join(loaded.collaboration.members)}); "
                          f"add it to policies/{loaded.name}/collaboration.yaml first")
    ensure(conn)
    login = login_name(loaded.name, member)
    if len(login) > access.MAX_IDENTIFIER:
        raise MemberError(f"the login {login} would be longer than PostgreSQL's {access.MAX_IDENTIFIER} characters; shorten the "
                          "collaboration or member name")
    password = secrets.token_urlsafe(24)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('dcr-members'))")
        if conn.execute("select 1 from dcr_meta.member_logins where login = %s", (login,)).fetchone():
            raise MemberError(f"{member} of {loaded.name} has a login already ({login}): `dcr member rotate {loaded.name} {member}` "
                              "for a new password, or revoke it first")
        if conn.execute("select 1 from pg_roles where rolname = %s", (login,)).fetchone():
            raise MemberError(f"a database role {login} exists that is no member login of this deployment; drop or rename it, "
                              "or choose other names")
        access.apply(conn, loaded)  # the member's group roles exist
        role = sql.Identifier(login)
        conn.execute(sql.SQL("create role {} login nosuperuser nocreatedb nocreaterole noreplication nobypassrls inherit "
                             "connection limit 10 password {}").format(role, sql.Literal(scram_verifier(password))))
        for group in [*_groups(loaded, member), MEMBER_GROUP]:
            conn.execute(sql.SQL("grant {} to {}").format(sql.Identifier(group), role))
        conn.execute("insert into dcr_meta.member_logins (login, collaboration, member) values (%s, %s, %s)", (login, loaded.name, member))
    return login, password


def rotate(conn: psycopg.Connection, collab: str, member: str) -> tuple[str, str]:
    """A new password for ``member``'s login (the old one stops working; open sessions are ended)."""
    ensure(conn)
    login = login_name(collab, member)
    password = secrets.token_urlsafe(24)
    with conn.transaction():
        if not conn.execute("select 1 from dcr_meta.member_logins where login = %s", (login,)).fetchone():
            raise MemberError(f"{member} of {collab} has no login: `dcr member add {collab} {member}`")
        conn.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(login), sql.Literal(scram_verifier(password))))
        conn.execute("update dcr_meta.member_logins set rotated_at = now() where login = %s", (login,))
    _end_sessions(conn, login)
    return login, password


def revoke(conn: psycopg.Connection, collab: str, member: str) -> str:
    """Drop ``member``'s login (its open sessions are ended; its requests and answers stay in the audit)."""
    ensure(conn)
    login = login_name(collab, member)
    with conn.transaction():
        if not conn.execute("select 1 from dcr_meta.member_logins where login = %s", (login,)).fetchone():
            raise MemberError(f"{member} of {collab} has no login to revoke (`dcr member list {collab}`)")
        conn.execute(sql.SQL("alter role {} nologin").format(sql.Identifier(login)))
    _end_sessions(conn, login)
    with conn.transaction():
        conn.execute(sql.SQL("drop role {}").format(sql.Identifier(login)))
        conn.execute("delete from dcr_meta.member_logins where login = %s", (login,))
    return login


def _end_sessions(conn: psycopg.Connection, login: str) -> None:
    conn.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s and pid <> pg_backend_pid()", (login,))


def listing(conn: psycopg.Connection, collab: str) -> list[MemberLogin]:
    ensure(conn)
    rows = conn.execute("select login, collaboration, member, created_at, rotated_at from dcr_meta.member_logins "
                        "where collaboration = %s order by member", (collab,)).fetchall()
    return [MemberLogin(*r) for r in rows]


def drop_all(conn: psycopg.Connection, collab: str) -> list[str]:
    """Teardown: every member login of ``collab`` dropped."""
    return [revoke(conn, collab, m.member) for m in listing(conn, collab)]


def login_of(url: str, collab: str, member: str) -> str | None:
    """``member``'s login, None if it has none (or the database is down: the approval files then count for no member
    with a login anyway, see ``store.approvals``)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            return next((m.login for m in listing(conn, collab) if m.member == member), None)
    except psycopg.OperationalError:
        return None
