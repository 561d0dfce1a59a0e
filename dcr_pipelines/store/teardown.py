"""Removing one collaboration from the database: its schemas, its server-wide roles and its rows in ``dcr_meta``.

Roles are server-wide (``dcr_<collab>_...``, see :mod:`.access`): dropping a
database leaves them behind, so ``dcr db drop COLLAB`` removes them here. Names
are matched with care: ``dcr_demo_home_retailer_raw_owner`` could be party
``home_retailer`` of ``demo`` or party ``retailer`` of ``demo_home``; a name
that belongs to another known collaboration whose name extends this one's is
never touched. Dagster's run and event storage is not touched (the history of
what ran stays auditable), nor are files under ``DCR_HOME``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from ..lib import naming
from . import access, migrations

# dcr_meta tables with a collaboration column: every row of the collaboration goes with it.
META_TABLES = ("uploads", "dataset_versions", "stage_builds", "query_requests", "released_people", "member_logins", "member_requests")
_FIXED_ROLES = ("admin", "matching", "analysis_builder", "query_runner", "dbt_login", "pre_noise_reader")
_PARTY_ROLES = ("raw_owner", "staging_loader", "result_reader", "member")  # member: a member login


@dataclass(frozen=True)
class DropPlan:
    collaboration: str
    schemas: list[str]
    roles: list[str]
    meta_rows: dict[str, int]

    @property
    def empty(self) -> bool:
        return not self.schemas and not self.roles and not any(self.meta_rows.values())


@dataclass
class DropOutcome:
    schemas: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    kept_roles: dict[str, str] = field(default_factory=dict)  # role -> why it could not be dropped
    meta_rows: int = 0


def _known_collaborations(conn: psycopg.Connection, extra: Iterable[str]) -> set[str]:
    """Every collaboration this database or the policies folder knows: folders, fixed schemas, admin roles."""
    known = set(extra)
    for (name,) in conn.execute("select nspname from pg_namespace where nspname ~ '_(matching|analysis|results)$'").fetchall():
        known.add(re.sub(r"_(matching|analysis|results)$", "", str(name)))
    for (name,) in conn.execute("select rolname from pg_roles where rolname ~ '^dcr_.+_admin$'").fetchall():
        known.add(str(name)[len("dcr_"):-len("_admin")])
    return known


def _others(collab: str, known: set[str]) -> list[str]:
    """Known collaborations whose names extend this one's (``demo_home`` for ``demo``): their names are never ours."""
    return sorted(k for k in known if k != collab and k.startswith(collab + "_"))


def plan(conn: psycopg.Connection, collab: str, parties: Sequence[str] = (), other_collaborations: Iterable[str] = ()) -> DropPlan:
    """What ``drop`` would remove: the collaboration's schemas and roles present on the server, and its dcr_meta rows.

    ``parties`` are the policy's (if it still loads); parties removed from the policy earlier are found by name.
    """
    others = _others(collab, _known_collaborations(conn, other_collaborations))
    party = r"[a-z][a-z0-9_]*"
    schema_pattern = re.compile(rf"^{re.escape(collab)}_(matching|analysis|results|raw_{party}|staging_{party})$")
    role_pattern = re.compile(
        rf"^{re.escape(access.role_name(collab))}_({'|'.join(_FIXED_ROLES)}|adhoc_[0-9a-f]+|{party}_({'|'.join(_PARTY_ROLES)}))$"
    )
    expected_schemas = {naming.matching_schema(collab), naming.analysis_schema(collab), naming.results_schema(collab)}
    expected_schemas |= {s for p in parties for s in (naming.raw_schema(collab, p), naming.staging_schema(collab, p))}

    def foreign(name: str, prefix: str) -> bool:
        return any(name.startswith(f"{prefix}{o}_") for o in others)

    schemas = sorted(
        str(n) for (n,) in conn.execute("select nspname from pg_namespace where left(nspname, %s) = %s", (len(collab) + 1, collab + "_")).fetchall()
        if str(n) in expected_schemas or (schema_pattern.match(str(n)) and not foreign(str(n), ""))
    )
    prefix = access.role_name(collab) + "_"
    roles = sorted(
        str(n) for (n,) in conn.execute("select rolname from pg_roles where left(rolname, %s) = %s", (len(prefix), prefix)).fetchall()
        if role_pattern.match(str(n)) and not foreign(str(n), "dcr_")
    )
    meta_rows: dict[str, int] = {}
    for table in META_TABLES:
        if conn.execute("select to_regclass(%s)", (f"{migrations.META_SCHEMA}.{table}",)).fetchone()[0] is None:  # type: ignore[index]
            continue
        count = conn.execute(sql.SQL("select count(*) from {} where collaboration = %s").format(sql.Identifier(migrations.META_SCHEMA, table)),
                             (collab,)).fetchone()
        meta_rows[table] = int(count[0]) if count else 0
    return DropPlan(collab, schemas, roles, meta_rows)


def drop(conn: psycopg.Connection, planned: DropPlan) -> DropOutcome:
    """Drop the planned schemas (cascade), delete the collaboration's dcr_meta rows and migration records, then drop each
    role (what it still owns or is granted in this database first). A role that still holds objects or privileges in
    another database of the server is kept and reported: run ``dcr db drop`` against that database too."""
    outcome = DropOutcome()
    collab = planned.collaboration
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-grants:{collab}",))  # not while its grants are applied
        for schema in planned.schemas:
            conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(schema)))
            outcome.schemas.append(schema)
        for table in planned.meta_rows:
            deleted = conn.execute(sql.SQL("delete from {} where collaboration = %s").format(sql.Identifier(migrations.META_SCHEMA, table)), (collab,))
            outcome.meta_rows += deleted.rowcount
        if conn.execute("select to_regclass(%s)", (f"{migrations.META_SCHEMA}.{migrations.TRACKER}",)).fetchone()[0] is not None:  # type: ignore[index]
            scopes = [migrations.scope("results", naming.results_schema(collab)), migrations.scope("analysis", naming.analysis_schema(collab)),
                      migrations.scope("matching", naming.matching_schema(collab))]
            conn.execute(sql.SQL("delete from {} where scope = any(%s)").format(sql.Identifier(migrations.META_SCHEMA, migrations.TRACKER)), (scopes,))
        if conn.execute("select to_regclass('dcr_keys.hmac_pads')").fetchone()[0] is not None:  # type: ignore[index]
            conn.execute("delete from dcr_keys.hmac_pads where login = %s", (access.builder_role(collab),))  # a killed build's
    for role in planned.roles:
        ident = sql.Identifier(role)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("drop owned by {}").format(ident))
                conn.execute(sql.SQL("drop role {}").format(ident))
        except psycopg.errors.DependentObjectsStillExist as exc:
            outcome.kept_roles[role] = (exc.diag.message_detail or str(exc)).splitlines()[0]
        except psycopg.errors.InsufficientPrivilege as exc:
            outcome.kept_roles[role] = str(exc).splitlines()[0]
        except psycopg.errors.UndefinedObject:
            continue  # dropped meanwhile
        else:
            outcome.roles.append(role)
    return outcome

