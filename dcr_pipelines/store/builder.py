"""The login dbt builds a collaboration as, and keys its models may use but never read.

Each collaboration ``c`` has a login role ``dcr_c_dbt_login``: not a superuser, no CREATEDB or CREATEROLE, owning only
the models dbt builds in that collaboration's schemas (see ``access.plan`` for what it may read and write). Policy
text never reaches a template engine (``lib.policy``), and even a model that did something unexpected runs with
this login's rights: it cannot read a file or a process environment of the server, another collaboration's
schemas, or the keys.

Keys: a staging build opens the parties' HMAC pads to the builder for its own duration (``open_pads``): rows of
``dcr_keys.hmac_pads`` keyed by the builder login, readable only by ``dcr_keyholder``; the models call
``dcr_keys.keyed_token(party, value)`` (security definer), which returns tokens, never the pads. The pads are
deleted when the build ends (and overwritten by the next build if a killed one left them). No key is ever in the
dbt process's environment, a session setting, SQL text or an artefact.

The builder's password is derived from the collaboration's pairing key (an HMAC of a fixed label): nothing new to
provision, a rotated pairing key rotates it, and the password tells nothing about the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..lib import naming
from ..lib.keys import hmac_pads
from ..lib.policy import LoadedCollaboration
from . import access, migrations
from . import analysis as store_analysis

KEYS_SCHEMA = "dcr_keys"
META_READS = ("query_requests", "dataset_versions")  # what the macros read (dcr_param, dcr_upload_rows)
REQUESTS_VIEW = "requests"  # <c>_analysis.requests: the operator's view of the collaboration's rows of dcr_meta.query_requests
DBT_SUFFIXES = ("", "__dbt_tmp", "__dbt_backup")  # a model's relation, and what dbt-postgres swaps it through

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Login:
    user: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"Login({self.user!r}, <redacted>)"


def login_name(collab: str) -> str:
    return access.builder_role(collab)


def login(collab: str, pairing_key: bytes) -> Login:
    return Login(login_name(collab), hmac.new(pairing_key, f"dcr-builder-login:{collab}".encode(), hashlib.sha256).hexdigest())


def model_schemas(loaded: LoadedCollaboration) -> list[str]:
    """The schemas dbt writes models into: each party's raw (normalised, identities) and staging, and the analysis."""
    c = loaded.name
    return [s for p in loaded.parties() for s in (naming.raw_schema(c, p), naming.staging_schema(c, p))] + [naming.analysis_schema(c)]


class BuilderTampered(RuntimeError):
    """The builder login has made or holds something a model never makes; nothing of it is read."""


def model_relations(loaded: LoadedCollaboration) -> set[tuple[str, str]]:
    """(schema, relation) of every model dbt builds for the collaboration (the aliases of ``lib.dbt_codegen``)."""
    c = loaded.name
    out = {(naming.raw_schema(c, p), "identities") for p in loaded.parties()}
    for name, ds in loaded.collaboration.datasets.items():
        out |= {(naming.raw_schema(c, ds.owner), f"{name}__normalised"), (naming.staging_schema(c, ds.owner), name)}
        out |= {(naming.analysis_schema(c), f"matched_{name}{naming.overlap_suffix(s, loaded.parties())}") for s in loaded.overlaps() if ds.owner in s}
    out |= {(naming.analysis_schema(c), f"query_{q}") for q in loaded.queries}
    return {(schema, rel + suffix) for schema, rel in out for suffix in DBT_SUFFIXES}


def ensure(conn: psycopg.Connection, loaded: LoadedCollaboration, who: Login) -> None:
    """Create or update the builder login and hand it the collaboration's models built before it existed; idempotent.

    The grants are the grants asset's (``access.apply``, first in every pipeline run); applied here too when the builder
    lacks them (a deployment from before the builder existed, asked for a release before its next pipeline run)."""
    migrations.ensure(conn, "meta")
    role = sql.Identifier(who.user)
    schemas = model_schemas(loaded)
    exists = conn.execute("select 1 from pg_roles where rolname = %s", (who.user,)).fetchone() is not None
    granted = exists and conn.execute("select count(*) from pg_namespace n where n.nspname = any(%s) and has_schema_privilege(%s, n.oid, 'CREATE')",
                                      (schemas, who.user)).fetchone() == (len(schemas),)
    if not granted:
        access.apply(conn, loaded)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-grants:{loaded.name}",))
        if conn.execute("select 1 from pg_roles where rolname = %s", (who.user,)).fetchone() is None:
            conn.execute(sql.SQL("create role {} login noinherit").format(role))  # no attribute beyond LOGIN (the defaults)
        # Only LOGIN and the password change here (an operator that is not a superuser may not name the other attributes);
        # a role of this name with any power, or a member of any role, is refused instead of used.
        conn.execute(sql.SQL("alter role {} login password {}").format(role, sql.Literal(who.password)))
        power = conn.execute(
            "select rolsuper or rolcreatedb or rolcreaterole or rolreplication or rolbypassrls, "
            "exists (select 1 from pg_auth_members m where m.member = r.oid) from pg_roles r where rolname = %s", (who.user,)).fetchone()
        if power is None or power[0] or power[1]:
            raise BuilderTampered(f"role {who.user} exists with attributes or memberships a dbt login must not have (superuser, createdb, "
                                  "createrole, replication, bypassrls, or a member of another role): nothing was built; drop the role "
                                  f"(`dcr db drop {loaded.name}`, or DROP ROLE) and run again")
        conn.execute(sql.SQL("grant {} to current_user").format(role))  # the operator may grant on (and drop) its models
        conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(KEYS_SCHEMA), role))
        conn.execute(sql.SQL("grant execute on function {}(text, text) to {}").format(sql.Identifier(KEYS_SCHEMA, "keyed_token"), role))
        # The request being built and the current upload tables: its own collaboration's rows only (row-level security).
        conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(migrations.META_SCHEMA), role))
        for table in META_READS:
            conn.execute(sql.SQL("grant select on {} to {}").format(sql.Identifier(migrations.META_SCHEMA, table), role))
        # The pre-noise views read the request they serve through the operator's view of the collaboration's requests
        # (macro dcr_requests): through a view of the builder's, row-level security on dcr_meta.query_requests would
        # judge whoever reads (the operator), and the builder needs no row of another collaboration.
        analysis = sql.Identifier(naming.analysis_schema(loaded.name))
        requests = sql.Identifier(naming.analysis_schema(loaded.name), REQUESTS_VIEW)
        migrations.ensure(conn, "analysis", naming.analysis_schema(loaded.name))
        # "offset 0": not auto-updatable, so the schema's grants (the analysis roles get all on its tables) read it and
        # write nothing through it; a rule or trigger that would make it writable is refused by ``verify``.
        conn.execute(sql.SQL("create or replace view {} as select query_name, params, request_key from {} where collaboration = {} offset 0").format(
            requests, sql.Identifier(migrations.META_SCHEMA, "query_requests"), sql.Literal(loaded.name)))
        conn.execute(sql.SQL("grant select on {} to {}").format(requests, role))
        # Who reads a pre-noise view (store/analysis.read_pre_noise): select on the builder's views there, nothing else.
        reader = sql.Identifier(store_analysis.pre_noise_reader(loaded.name))
        if conn.execute("select 1 from pg_roles where rolname = %s", (store_analysis.pre_noise_reader(loaded.name),)).fetchone() is None:
            conn.execute(sql.SQL("create role {} nologin").format(reader))
        conn.execute(sql.SQL("grant {} to current_user").format(reader))
        conn.execute(sql.SQL("grant usage on schema {} to {}").format(analysis, reader))
        conn.execute(sql.SQL("alter default privileges for role {} in schema {} grant select on tables to {}").format(role, analysis, reader))
        # Models built before the builder existed (by the operator's login) become the builder's, so dbt can replace them.
        rows = conn.execute(
            "select n.nspname, c.relname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = any(%s) and c.relkind in ('r', 'v', 'm', 'p') and pg_get_userbyid(c.relowner) <> %s",
            (schemas, who.user),
        ).fetchall()
        for q in loaded.queries:
            if conn.execute("select to_regclass(%s)", (sql.Identifier(naming.analysis_schema(loaded.name), f"query_{q}").as_string(conn),)).fetchone()[0]:  # type: ignore[index]
                conn.execute(sql.SQL("grant select on {} to {}").format(sql.Identifier(naming.analysis_schema(loaded.name), f"query_{q}"), reader))
        models = model_relations(loaded)
        for schema, name, kind in rows:
            if (schema, name) in models:
                what = sql.SQL("view" if kind == "v" else "materialized view" if kind == "m" else "table")
                conn.execute(sql.SQL("alter {} {} owner to {}").format(what, sql.Identifier(schema, name), role))


@contextlib.contextmanager
def open_pads(conn: psycopg.Connection, who: Login, keys: Mapping[str, bytes]) -> Iterator[None]:
    """The parties' HMAC pads usable (not readable) by ``who`` for the duration of the block; deleted afterwards."""
    migrations.ensure(conn, "meta")
    table = sql.Identifier(KEYS_SCHEMA, "hmac_pads")
    with conn.transaction():
        conn.execute(sql.SQL("delete from {} where login = %s").format(table), (who.user,))
        for party, key in sorted(keys.items()):
            pads = hmac_pads(key)
            conn.execute(sql.SQL("insert into {} (login, party, inner_pad, outer_pad) values (%s, %s, %s, %s)").format(table),
                         (who.user, party, pads.inner, pads.outer))
    try:
        yield
    finally:
        with conn.transaction():
            conn.execute(sql.SQL("delete from {} where login = %s").format(table), (who.user,))


def _retire_earlier_models(conn: psycopg.Connection, loaded: LoadedCollaboration, oid: int, models: set[tuple[str, str]]) -> None:
    """Drop what an earlier policy's models left in the analysis schema: a matched view of a set of parties no query
    reads any more, a removed query's pre-noise view (or its table, from before they were views; the builder's, without
    row security).
    Dropping is the safe way round; anything else the builder holds is still refused by ``verify``."""
    schema = naming.analysis_schema(loaded.name)
    for name, kind in conn.execute(
            "select c.relname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relowner = %s "
            "and n.nspname = %s and not c.relrowsecurity and ((c.relname like 'matched\\_%%' and c.relkind = 'v') "
            "or (c.relname like 'query\\_%%' and c.relkind in ('r', 'v')))", (oid, schema)).fetchall():
        if (schema, name) not in models:
            conn.execute(sql.SQL("drop {} if exists {} cascade").format(sql.SQL("view" if kind == "v" else "table"), sql.Identifier(schema, name)))
            log.warning("%s: dropped %s.%s, left by an earlier policy (no model makes it now)", loaded.name, schema, name)


def verify(conn: psycopg.Connection, loaded: LoadedCollaboration) -> None:
    """Before the operator reads what the builder built, and after every build: the builder owns its models (tables, and
    the matched and pre-noise views) and nothing else, with no function, trigger, rule or row policy anywhere in the collaboration's
    schemas. A view or a policy calling a function of the builder's would run that function as whoever reads it."""
    who = login_name(loaded.name)
    row = conn.execute("select oid from pg_roles where rolname = %s", (who,)).fetchone()
    if row is None:
        return
    oid = row[0]
    schemas = [*model_schemas(loaded), naming.matching_schema(loaded.name), naming.results_schema(loaded.name)]
    found: list[str] = []
    found += [f"function {n}.{f}" for n, f in conn.execute(
        "select n.nspname, p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace where p.proowner = %s", (oid,)).fetchall()]
    models = model_relations(loaded)
    _retire_earlier_models(conn, loaded, oid, models)
    for schema, name, kind, secured in conn.execute(
            "select n.nspname, c.relname, c.relkind, c.relrowsecurity from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where c.relowner = %s and c.relpersistence <> 't' and c.relkind not in ('i', 'I', 'S', 't', 'c')", (oid,)).fetchall():
        # matched models are views; pre-noise models too (a table from before they were views, until dbt rebuilds it)
        expected = "v" if name.startswith("matched_") else "rv" if name.startswith("query_") else "r"
        if (schema, name) not in models or kind not in expected or secured:
            found.append(f"relation {schema}.{name} (kind {kind}{', row security' if secured else ''})")
    found += [f"trigger {t} on {n}.{c}" for t, n, c in conn.execute(
        "select t.tgname, n.nspname, c.relname from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace "
        "where not t.tgisinternal and n.nspname = any(%s)", (schemas,)).fetchall()]
    found += [f"rule {r} on {n}.{c}" for r, n, c in conn.execute(
        "select r.rulename, n.nspname, c.relname from pg_rewrite r join pg_class c on c.oid = r.ev_class join pg_namespace n on n.oid = c.relnamespace "
        "where r.rulename <> '_RETURN' and n.nspname = any(%s)", (schemas,)).fetchall()]
    found += [f"row policy {p} on {n}.{c}" for p, n, c in conn.execute(
        "select p.polname, n.nspname, c.relname from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = any(%s)", (schemas,)).fetchall()]
    if found:
        raise BuilderTampered(f"{loaded.name}: the dbt login {who} made or holds what no model makes ({'; '.join(sorted(found)[:5])}"
                              f"{'; ...' if len(found) > 5 else ''}); nothing was read from its models. Investigate, drop those objects, "
                              f"then `dcr run {loaded.name}`")
