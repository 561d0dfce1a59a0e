"""Which request each query's pre-noise view serves, the model dbt built it from, and the requests the query models read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from ..lib import naming
from . import access, migrations

REQUESTS_TABLE = "dcr_meta.query_requests"


def record_requests(conn: psycopg.Connection, collaboration: str, requests: Mapping[str, tuple[Mapping[str, str], str]]) -> None:
    """Write the (validated) parameters and request key each query's pre-noise table is about to be built for.

    The query models read them (macro ``dcr_param``); the caller holds the
    collaboration's analysis lock, so no other build changes them meanwhile.
    """
    migrations.ensure(conn, "meta")
    with conn.transaction():
        for query, (params, key) in requests.items():
            conn.execute(
                f"insert into {REQUESTS_TABLE} (collaboration, query_name, params, request_key) values (%s, %s, %s, %s) "
                "on conflict (collaboration, query_name) do update set params = excluded.params, request_key = excluded.request_key, written_at = now()",
                (collaboration, query, json.dumps(dict(params)), key),
            )


def _built_from(collab: str) -> sql.Identifier:
    return sql.Identifier(naming.analysis_schema(collab), "built_from")


def record_built(conn: psycopg.Connection, collab: str, built: Mapping[str, tuple[Mapping[str, str], str]], versions: Mapping[str, Any],
                 models: Mapping[str, str] | None = None) -> None:
    """For each query whose pre-noise view now serves a request: its parameters, input versions and request key, and,
    when dbt just built the view, the model it was built from (``models``: query -> lib/dbt_codegen.model_digest)."""
    migrations.ensure(conn, "analysis", naming.analysis_schema(collab))
    table = _built_from(collab)
    with conn.transaction():
        for query_name, (values, key) in built.items():
            model = (models or {}).get(query_name)
            conn.execute(
                sql.SQL("insert into {} (query_name, params, input_versions, request_key, model_sha256, built_at) values (%s, %s, %s, %s, %s, now()) "
                        "on conflict (query_name) do update set params = excluded.params, input_versions = excluded.input_versions, "
                        "request_key = excluded.request_key, model_sha256 = coalesce(excluded.model_sha256, {}.model_sha256), "
                        "built_at = now()").format(table, sql.Identifier("built_from")),
                (query_name, json.dumps(dict(values)), json.dumps(dict(versions)), key, model),
            )


def model_built(conn: psycopg.Connection, collab: str, query_name: str) -> str | None:
    """The model digest the query's pre-noise view was last built from by dbt (None: never, or the view is gone)."""
    migrations.ensure(conn, "analysis", naming.analysis_schema(collab))
    row = conn.execute(sql.SQL("select model_sha256 from {} where query_name = %s and to_regclass(%s) is not null").format(_built_from(collab)),
                       (query_name, sql.Identifier(naming.analysis_schema(collab), f"query_{query_name}").as_string(conn))).fetchone()
    return str(row[0]) if row and row[0] is not None else None


def requested_for(conn: psycopg.Connection, collab: str, query_name: str) -> str | None:
    """The request key in the query's request row: the request its pre-noise view serves now (None: none yet)."""
    migrations.ensure(conn, "meta")
    row = conn.execute(f"select request_key from {REQUESTS_TABLE} where collaboration = %s and query_name = %s", (collab, query_name)).fetchone()
    return str(row[0]) if row and row[0] is not None else None


def pre_noise_reader(collab: str) -> str:
    """The role a pre-noise view is read as: NOLOGIN, no superuser, SELECT on the builder's views of the analysis schema
    and nothing else (store/builder.ensure makes it). The view is the builder's; a function it calls runs as its reader."""
    return access.role_name(collab, "pre_noise_reader")  # store/teardown.py drops it with the collaboration


def read_pre_noise(conn: psycopg.Connection, collab: str, statement: sql.Composed, params: Any = None) -> list[Any]:
    """The rows of ``statement`` over a pre-noise view, read as :func:`pre_noise_reader` (never as the operator)."""
    conn.execute(sql.SQL("set role {}").format(sql.Identifier(pre_noise_reader(collab))))
    try:
        return conn.execute(statement, params).fetchall()
    finally:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:  # an aborted transaction's rollback undoes the set
            conn.execute("reset role")


def built_for(conn: psycopg.Connection, collab: str, query_name: str) -> str | None:
    """The request key the query's pre-noise table was last built for (None: never)."""
    migrations.ensure(conn, "analysis", naming.analysis_schema(collab))
    row = conn.execute(sql.SQL("select request_key from {} where query_name = %s").format(_built_from(collab)), (query_name,)).fetchone()
    return str(row[0]) if row and row[0] is not None else None
