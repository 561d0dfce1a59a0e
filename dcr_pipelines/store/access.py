"""Least-privilege PostgreSQL roles and grants, derived from the policy.

Per party ``p`` of collaboration ``c`` (all roles are NOLOGIN groups; a
deployment grants them to its login users):

- ``dcr_c_p_raw_owner``       owns the party's raw schema (uploads, normalised identifiers)
- ``dcr_c_p_staging_loader``  reads the party's raw schema, writes its staging schema;
                              the party's half of PSI reads its identifiers as this role
- ``dcr_c_p_result_reader``   reads the released results of queries the party receives

Shared: ``dcr_c_matching`` (reads staging tokens, writes the cross-reference),
``dcr_c_analysis_builder`` (reads staging and matching, writes pre-noise
aggregates), ``dcr_c_query_runner`` (reads released results only) and
``dcr_c_admin`` (everything of this collaboration). PUBLIC gets nothing.

``dcr_c_dbt_login`` is the one login: dbt builds the collaboration's models as it
(``store.builder``). It may create its models in the raw, staging and analysis
schemas and reads what is there (never changes a table it does not own), reads
the cross-reference, and nothing else: no results, no other collaboration, no keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..lib.policy.models import Ability

OVERLAP = "overlap"  # the results table of the DP overlap release (matching.overlap_release: dp)

Level = Literal["read", "build", "write"]  # build: read the tables, create (and so own) new ones
MAX_IDENTIFIER = 63


@dataclass(frozen=True)
class Grant:
    role: str
    schema: str
    level: Level


def role_name(collab: str, *parts: str) -> str:
    return "_".join(["dcr", collab, *parts])


def builder_role(collab: str) -> str:
    """The login dbt builds the collaboration as (store.builder)."""
    return role_name(collab, "dbt_login")  # no other role kind ends so: no collaboration's name can make it another's role


def roles(loaded: LoadedCollaboration) -> list[str]:
    c = loaded.name
    out = [role_name(c, "admin")]
    for p in loaded.parties():
        out += [role_name(c, p, "raw_owner"), role_name(c, p, "staging_loader"), role_name(c, p, "result_reader")]
    # Members without data that receive results (an agency running ad-hoc queries) read their results too.
    for m, member in loaded.collaboration.members.items():
        if m not in loaded.parties() and Ability.RECEIVE_RESULTS in member.abilities:
            out.append(role_name(c, m, "result_reader"))
    out += [role_name(c, "matching"), role_name(c, "analysis_builder"), role_name(c, "query_runner"), builder_role(c)]
    return out


def schemas(loaded: LoadedCollaboration) -> list[str]:
    c = loaded.name
    out = []
    for p in loaded.parties():
        out += [naming.raw_schema(c, p), naming.staging_schema(c, p)]
    return out + [naming.matching_schema(c), naming.analysis_schema(c), naming.results_schema(c)]


def plan(loaded: LoadedCollaboration) -> list[Grant]:
    """Every (role, schema, level) the policy allows; anything not listed is denied."""
    c = loaded.name
    grants = [Grant(role_name(c, "admin"), s, "write") for s in schemas(loaded)]
    for p in loaded.parties():
        grants.append(Grant(role_name(c, p, "raw_owner"), naming.raw_schema(c, p), "write"))
        grants.append(Grant(role_name(c, p, "staging_loader"), naming.raw_schema(c, p), "read"))
        grants.append(Grant(role_name(c, p, "staging_loader"), naming.staging_schema(c, p), "write"))
        grants.append(Grant(role_name(c, "matching"), naming.staging_schema(c, p), "read"))
        grants.append(Grant(role_name(c, "analysis_builder"), naming.staging_schema(c, p), "read"))
    grants.append(Grant(role_name(c, "matching"), naming.matching_schema(c), "write"))
    grants.append(Grant(role_name(c, "analysis_builder"), naming.matching_schema(c), "read"))
    grants.append(Grant(role_name(c, "analysis_builder"), naming.analysis_schema(c), "write"))
    # The builder creates (and so owns) its models and reads what they read; on a table it does not own it gets SELECT
    # and nothing else (no TRIGGER, no writes): nothing it makes can run when the operator writes its own tables.
    for p in loaded.parties():
        grants.append(Grant(builder_role(c), naming.raw_schema(c, p), "build"))
        grants.append(Grant(builder_role(c), naming.staging_schema(c, p), "build"))
    grants.append(Grant(builder_role(c), naming.matching_schema(c), "read"))
    grants.append(Grant(builder_role(c), naming.analysis_schema(c), "build"))
    return grants


def overlap_receivers(loaded: LoadedCollaboration) -> list[str]:
    """Members that receive the DP overlap release: every member with receive_results."""
    return [m for m, member in loaded.collaboration.members.items() if Ability.RECEIVE_RESULTS in member.abilities]


def result_readers(loaded: LoadedCollaboration, query_name: str) -> list[str]:
    """Roles that may read a query's released results: its receivers' readers and the query runner.

    The overlap release (``overlap``) goes to every member that receives results.
    """
    receivers = overlap_receivers(loaded) if query_name == OVERLAP else list(loaded.queries[query_name].spec.receivers)
    return [role_name(loaded.name, r, "result_reader") for r in receivers] + [role_name(loaded.name, "query_runner")]


def _create_role(conn: psycopg.Connection, role: str) -> None:
    if conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone() is None:
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            conn.execute(sql.SQL("create role {} nologin").format(sql.Identifier(role)))


def apply(conn: psycopg.Connection, loaded: LoadedCollaboration) -> int:
    """Create the schemas and roles and (re)apply every grant; idempotent. Returns the grant count."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-grants:{loaded.name}",))
        for schema in schemas(loaded):
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("revoke all on schema {} from public").format(sql.Identifier(schema)))
        for role in roles(loaded):
            _create_role(conn, role)
            # The operator's session acts as each party's half of the protocol, and sets the builder's defaults below.
            conn.execute(sql.SQL("grant {} to current_user").format(sql.Identifier(role)))
        grants = plan(loaded)
        builder = sql.Identifier(builder_role(loaded.name))
        for g in grants:
            schema_id, role_id = sql.Identifier(g.schema), sql.Identifier(g.role)
            # Tables the operator creates and tables the builder's models create get the same grants.
            defaults = [sql.SQL("alter default privileges in schema {} ").format(schema_id),
                        sql.SQL("alter default privileges for role {} in schema {} ").format(builder, schema_id)]
            if g.level == "write":
                conn.execute(sql.SQL("grant usage, create on schema {} to {}").format(schema_id, role_id))
                conn.execute(sql.SQL("grant all on all tables in schema {} to {}").format(schema_id, role_id))
                for d in defaults:
                    conn.execute(d + sql.SQL("grant all on tables to {}").format(role_id))
            else:
                conn.execute(sql.SQL("grant usage{} on schema {} to {}").format(sql.SQL(", create" if g.level == "build" else ""), schema_id, role_id))
                conn.execute(sql.SQL("grant select on all tables in schema {} to {}").format(schema_id, role_id))
                for d in defaults:
                    conn.execute(d + sql.SQL("grant select on tables to {}").format(role_id))
        results = naming.results_schema(loaded.name)
        for query_name in [*loaded.queries, *([OVERLAP] if loaded.collaboration.matching.overlap_release != "withheld" else [])]:
            for reader in result_readers(loaded, query_name):
                conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(results), sql.Identifier(reader)))
            grant_results(conn, loaded, query_name)
    return len(grants)


def grant_results(conn: psycopg.Connection, loaded: LoadedCollaboration, query_name: str) -> None:
    """Let exactly the receivers (and the query runner) read a query's released results table."""
    table = sql.Identifier(naming.results_schema(loaded.name), query_name)
    exists = conn.execute("select to_regclass(%s)", (f"{naming.results_schema(loaded.name)}.{query_name}",)).fetchone()[0]  # type: ignore[index]
    if exists is None:
        return
    for reader in result_readers(loaded, query_name):
        if conn.execute("select 1 from pg_roles where rolname = %s", (reader,)).fetchone() is not None:
            conn.execute(sql.SQL("grant select on {} to {}").format(table, sql.Identifier(reader)))


@dataclass(frozen=True)
class Privileges:
    usage: bool
    create: bool
    tables: int
    readable: int
    writable: int

    def cell(self) -> str:
        if not self.usage:
            return "-"
        if self.create or (self.tables and self.writable == self.tables):
            return "write"
        if self.tables and self.readable == self.tables:
            return "read"
        if self.readable:
            return f"read {self.readable}/{self.tables}"
        return "usage"


def matrix(conn: psycopg.Connection, loaded: LoadedCollaboration) -> dict[str, dict[str, Privileges]]:
    """What each role can actually do on each schema, read back from the database."""
    out: dict[str, dict[str, Privileges]] = {}
    for role in roles(loaded):
        out[role] = {}
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone()
        for schema in schemas(loaded):
            present = conn.execute("select 1 from pg_namespace where nspname = %s", (schema,)).fetchone()
            if not exists or not present:
                out[role][schema] = Privileges(False, False, 0, 0, 0)
                continue
            usage, create = conn.execute(
                "select has_schema_privilege(%s, %s, 'USAGE'), has_schema_privilege(%s, %s, 'CREATE')", (role, schema, role, schema)
            ).fetchone()  # type: ignore[misc]
            tables, readable, writable = conn.execute(
                "select count(*), count(*) filter (where has_table_privilege(%s, c.oid, 'SELECT')), "
                "count(*) filter (where has_table_privilege(%s, c.oid, 'INSERT')) "
                "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = %s and c.relkind in ('r', 'v', 'm', 'p')",
                (role, role, schema),
            ).fetchone()  # type: ignore[misc]
            out[role][schema] = Privileges(bool(usage), bool(create), int(tables), int(readable), int(writable))
    return out
