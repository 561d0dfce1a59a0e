"""Versioned migrations: the one place that says which tables the product keeps and how they change.

Migrations are SQL files under ``store/migrations/<kind>/NNNN_name.sql``:

- ``meta``: the operator's bookkeeping in schema ``dcr_meta`` (one per database);
- ``results``, ``analysis``, ``matching``: one copy per collaboration, ``{schema}``
  standing for that collaboration's schema of the kind.

Each applied migration is recorded in ``dcr_meta.schema_migrations`` with the
SHA-256 of its text; a file changed after it was applied is refused (add a new
migration instead). Applying takes a transaction-level advisory lock, so two
processes starting at once apply each migration once. ``dcr db migrate``
applies everything; every store function calls :func:`ensure` for the scope
it touches, which costs one query once the scope is up to date.

Tables whose columns follow the policy (a query's results, a runner's ad-hoc
results, the cross-reference with one token column per party) are created by
their store functions from the policy; these files own every fixed table.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

Kind = Literal["meta", "results", "analysis", "matching"]
KINDS: tuple[Kind, ...] = ("meta", "results", "analysis", "matching")
FOLDER = Path(__file__).parent / "migrations"
META_SCHEMA = "dcr_meta"
TRACKER = "schema_migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """A migration cannot be applied (the message names the file and the fix)."""


@dataclass(frozen=True)
class Migration:
    kind: Kind
    version: int
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def file(self) -> str:
        return f"dcr_pipelines/store/migrations/{self.kind}/{self.version:04d}_{self.name}.sql"

    def statement(self, schema: str) -> sql.Composed:
        """The migration's SQL for one schema (``{schema}`` is replaced by the quoted identifier)."""
        return sql.SQL(self.text.replace("{", "{{").replace("}", "}}").replace("{{schema}}", "{schema}")).format(schema=sql.Identifier(schema))


@cache
def migrations(kind: Kind) -> tuple[Migration, ...]:
    """The migrations of one kind, in version order (versions must run 1, 2, 3, ... with no gap)."""
    found = []
    for path in sorted((FOLDER / kind).glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: a migration file is named NNNN_name.sql (lower case)")
        found.append(Migration(kind, int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"{migration.file}: version {migration.version} where {expected} was expected; versions run 1, 2, 3 with no gap")
    return tuple(found)


def scope(kind: Kind, schema: str) -> str:
    return kind if kind == "meta" else f"{kind}:{schema}"


@dataclass(frozen=True)
class Applied:
    scope: str
    version: int
    name: str


def _bootstrap(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(META_SCHEMA)))
    conn.execute(
        sql.SQL(
            "create table if not exists {} (scope text not null, version integer not null, name text not null, sha256 text not null, "
            "applied_at timestamptz not null default now(), primary key (scope, version))"
        ).format(sql.Identifier(META_SCHEMA, TRACKER))
    )


def _applied(conn: psycopg.Connection, scope_name: str) -> dict[int, str]:
    rows = conn.execute(
        sql.SQL("select version, sha256 from {} where scope = %s").format(sql.Identifier(META_SCHEMA, TRACKER)), (scope_name,)
    ).fetchall()
    return {int(v): str(s) for v, s in rows}


def _up_to_date(conn: psycopg.Connection, scope_name: str, pending: tuple[Migration, ...]) -> bool:
    """Whether every migration of the scope is applied; one query. An applied file that changed since is refused here too."""
    if conn.execute("select to_regclass(%s)", (f"{META_SCHEMA}.{TRACKER}",)).fetchone()[0] is None:  # type: ignore[index]
        return False
    applied = _applied(conn, scope_name)
    for migration in pending:
        if migration.version in applied and applied[migration.version] != migration.sha256:
            raise MigrationError(f"{migration.file} changed after it was applied to {scope_name}; restore it and add a new migration for the change")
    return all(m.version in applied for m in pending)


def ensure(conn: psycopg.Connection, kind: Kind, schema: str = META_SCHEMA) -> list[Applied]:
    """Apply the pending migrations of one scope (the meta scope first, it holds the tracker)."""
    if kind != "meta":
        ensure(conn, "meta")
    pending = migrations(kind)
    name = scope(kind, schema)
    if not pending or _up_to_date(conn, name, pending):
        return []
    done: list[Applied] = []
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('dcr-migrate'))")
        _bootstrap(conn)
        applied = _applied(conn, name)
        for migration in pending:
            if migration.version in applied:
                if applied[migration.version] != migration.sha256:
                    raise MigrationError(
                        f"{migration.file} changed after it was applied to {name}; restore it and add a new migration for the change"
                    )
                continue
            if kind != "meta":
                conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(migration.statement(schema))
            conn.execute(
                sql.SQL("insert into {} (scope, version, name, sha256) values (%s, %s, %s, %s)").format(sql.Identifier(META_SCHEMA, TRACKER)),
                (name, migration.version, migration.name, migration.sha256),
            )
            done.append(Applied(name, migration.version, migration.name))
    return done


def migrate(conn: psycopg.Connection, schemas: dict[Kind, list[str]]) -> list[Applied]:
    """Apply every pending migration: the meta scope, then each listed schema of each kind."""
    done = ensure(conn, "meta")
    for kind in KINDS[1:]:
        for schema in schemas.get(kind, []):
            done += ensure(conn, kind, schema)
    return done


def status(conn: psycopg.Connection) -> list[tuple[str, int, str, str]]:
    """(scope, version, name, applied_at) of every applied migration."""
    if conn.execute("select to_regclass(%s)", (f"{META_SCHEMA}.{TRACKER}",)).fetchone()[0] is None:  # type: ignore[index]
        return []
    rows = conn.execute(
        sql.SQL("select scope, version, name, applied_at::text from {} order by scope, version").format(sql.Identifier(META_SCHEMA, TRACKER))
    ).fetchall()
    return [(str(s), int(v), str(n), str(a)) for s, v, n, a in rows]
