"""Secure views and least privilege, proven against the database itself.

Uses the ``e2e`` collaboration materialized by test_end_to_end's fixture
(the query there has a single receiver, ad_network).
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from dbt.cli.main import dbtRunner

from dcr_pipelines.lib import naming
from dcr_pipelines.lib.keys import hmac_pads
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.store import access

from ..identifier_cases import CASES
from .conftest import CANARY, COLLAB

pytestmark = pytest.mark.slow


def _as_role(url: str, role: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f'set session authorization "{role}"')
    return conn


def _can_read(conn: psycopg.Connection, schema: str, table: str) -> bool:
    try:
        conn.execute(f'select 1 from "{schema}"."{table}" limit 1')
        return True
    except psycopg.errors.InsufficientPrivilege:
        return False


def _can_create(conn: psycopg.Connection, schema: str) -> bool:
    probe = f"probe_{uuid.uuid4().hex[:8]}"
    try:
        conn.execute(f'create table "{schema}"."{probe}" (i int)')
    except psycopg.errors.InsufficientPrivilege:
        return False
    conn.execute(f'drop table "{schema}"."{probe}"')
    return True


def _tables(url: str, schema: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = %s and c.relkind in ('r', 'v')",
            (schema,),
        ).fetchall()
    return sorted(r[0] for r in rows)


def test_every_role_reads_and_writes_exactly_what_the_policy_allows(e2e: dict[str, Any]) -> None:
    url = e2e["url"]
    from dcr_pipelines.lib.policy import load_collaboration

    loaded = load_collaboration(e2e["root"] / COLLAB)
    plan = {(g.role, g.schema): g.level for g in access.plan(loaded)}
    results = naming.results_schema(COLLAB)
    checked = 0
    for role in access.roles(loaded):
        with _as_role(url, role) as conn:
            assert conn.execute("select current_user").fetchone()[0] == role
            for schema in access.schemas(loaded):
                level = plan.get((role, schema))
                for table in _tables(url, schema):
                    expected = level is not None
                    if schema == results:
                        released = {"campaign_reach": "campaign_reach", "overlap": access.OVERLAP}.get(table)
                        expected = released is not None and role in access.result_readers(loaded, released)
                        expected = expected or role == access.role_name(COLLAB, "admin")
                    assert _can_read(conn, schema, table) == expected, (role, schema, table)
                    checked += 1
                assert _can_create(conn, schema) == (level in ("write", "build")), (role, schema)
    assert checked > 50


@pytest.mark.parametrize(
    ("role", "schema_of", "readable"),
    [
        ("retailer_staging_loader", "ad_network_raw", False),
        ("retailer_staging_loader", "ad_network_staging", False),
        ("retailer_raw_owner", "ad_network_raw", False),
        ("ad_network_staging_loader", "retailer_staging", False),
        ("query_runner", "retailer_raw", False),
        ("query_runner", "retailer_staging", False),
        ("query_runner", "matching", False),
        ("query_runner", "analysis", False),
        ("retailer_result_reader", "results", False),  # retailer does not receive campaign_reach here
        ("ad_network_result_reader", "results", True),
        ("analysis_builder", "retailer_raw", False),
        ("matching", "retailer_raw", False),
    ],
)
def test_the_lanes_named_in_the_design(e2e: dict[str, Any], role: str, schema_of: str, readable: bool) -> None:
    schema = {
        "ad_network_raw": naming.raw_schema(COLLAB, "ad_network"),
        "ad_network_staging": naming.staging_schema(COLLAB, "ad_network"),
        "retailer_raw": naming.raw_schema(COLLAB, "retailer"),
        "retailer_staging": naming.staging_schema(COLLAB, "retailer"),
        "matching": naming.matching_schema(COLLAB),
        "analysis": naming.analysis_schema(COLLAB),
        "results": naming.results_schema(COLLAB),
    }[schema_of]
    table = {"results": "campaign_reach", "matching": "cross_reference", "analysis": "query_campaign_reach"}.get(schema_of)
    tables = [table] if table else _tables(e2e["url"], schema)
    assert tables
    with _as_role(e2e["url"], access.role_name(COLLAB, role)) as conn:
        assert all(_can_read(conn, schema, t) == readable for t in tables), (role, schema)


def test_dcr_db_roles_prints_the_matrix(e2e: dict[str, Any]) -> None:
    from dcr_pipelines.lib.policy import load_collaboration

    loaded = load_collaboration(e2e["root"] / COLLAB)
    with psycopg.connect(e2e["url"]) as conn:
        grid = access.matrix(conn, loaded)
    assert grid[access.role_name(COLLAB, "query_runner")][naming.raw_schema(COLLAB, "retailer")].cell() == "-"
    assert grid[access.role_name(COLLAB, "retailer", "staging_loader")][naming.staging_schema(COLLAB, "retailer")].cell() == "write"
    assert grid[access.role_name(COLLAB, "retailer", "staging_loader")][naming.raw_schema(COLLAB, "retailer")].cell() == "read"
    assert grid[access.role_name(COLLAB, "ad_network", "result_reader")][naming.results_schema(COLLAB)].cell().startswith("read 2/")  # its release, the overlap


def test_granting_twice_changes_nothing(e2e: dict[str, Any]) -> None:
    from dcr_pipelines.lib.policy import load_collaboration

    loaded = load_collaboration(e2e["root"] / COLLAB)
    with psycopg.connect(e2e["url"], autocommit=True) as conn:
        before = access.matrix(conn, loaded)
        access.apply(conn, loaded)
        access.apply(conn, loaded)
        assert access.matrix(conn, loaded) == before


def _needles() -> list[bytes]:
    needles = []
    for key in CANARY.values():
        raw = bytes.fromhex(key)
        pads = hmac_pads(raw)
        needles += [key.encode(), key.upper().encode(), raw, pads.inner.hex().encode(), pads.outer.hex().encode(), pads.inner, pads.outer]
    return needles


def test_no_key_reaches_any_file_the_run_wrote_or_the_event_log(e2e: dict[str, Any]) -> None:
    home: Path = e2e["settings"].home
    project = e2e["settings"].dbt_project
    roots = [project / "target", project / "logs", PROJECT_ROOT / "dbt_project", home]
    needles = _needles()
    searched = 0
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            rel = path.relative_to(root).parts
            if not path.is_file() or path.name == "secrets.env" or (root == home and rel[0] == "pg" and not rel[-1].endswith(".log")):
                continue  # secrets.env is the development secret store; pg/ is the database's own storage
            data = path.read_bytes()
            searched += 1
            for needle in needles:
                assert needle not in data, f"key material in {path}"
    assert searched > 20
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert runs
    for run in runs:
        text = json.dumps(run.run_config) + "".join(dg.serialize_value(r) for r in instance.all_logs(run.run_id))
        for needle in needles[:5:]:
            assert needle.decode("latin-1") not in text, f"key material in the event log of run {run.run_id}"


def test_identifiers_that_cannot_be_normalised_are_counted_by_reason(e2e: dict[str, Any]) -> None:
    instance = dg.DagsterInstance.get()
    key = dg.AssetKey(naming.staging_key(COLLAB, "purchases"))
    records = instance.fetch_observations(key, limit=1).records
    assert records, "the staging step reports its rejections"
    meta = {k: v.value for k, v in records[0].asset_observation.metadata.items()}
    assert meta["rejected_customer_email_invalid_email"] == 2
    assert meta["rows_in"] - meta["rows_staged"] == 2




def test_the_identifier_spec_of_each_kind(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The documented normalisation (docs/identifiers.md), run as SQL through the real macros."""
    selects = []
    for i, (kind, options, raw, _, _) in enumerate(CASES):
        if kind == "phone":
            continue  # normalised in Python at ingest (store/phones.py); the e2e phone test runs them through the pipeline
        literal = "null::text" if raw is None else "'" + raw.replace("'", "''") + "'"
        selects.append(
            f"select {i} as i, {{{{ dcr_normalise_identifier('v', '{kind}', {json.dumps(options)}) }}}} as n, "
            f"{{{{ dcr_identifier_problem('v', '{kind}', dcr_normalise_identifier('v', '{kind}', {json.dumps(options)})) }}}} as why "
            f"from (select {literal} as v) as t"
        )
    inline = " union all ".join(selects)
    project = tmp_path / "dbt"  # the hand-written macros alone, compiled in a folder of this test's own
    shutil.copytree(PROJECT_ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "models", "golden"))
    result = dbtRunner().invoke(["compile", "--quiet", "--inline", inline, "--project-dir", str(project), "--profiles-dir", str(project)])
    assert result.success, result.exception
    compiled = result.result.results[0].node.compiled_code
    with psycopg.connect(runtime.warehouse.url()) as conn:
        got = {i: (n, why) for i, n, why in conn.execute(compiled).fetchall()}
    for i, (kind, options, raw, normalised, reason) in enumerate(CASES):
        if kind != "phone":
            assert got[i] == (normalised, reason), (kind, options, raw)


def test_a_staging_table_with_a_column_outside_the_shared_list_fails_its_check(e2e: dict[str, Any]) -> None:
    from dcr_pipelines.defs.dbt_project import prepare_project, project_dir
    from dcr_pipelines.lib.policy import load_collaboration

    schema = naming.staging_schema(COLLAB, "retailer")
    settings = e2e["settings"]
    project = project_dir(settings.dbt_project, settings.policies)
    prepare_project(settings.dbt_source, project, [load_collaboration(e2e["root"] / COLLAB)])
    args = ["test", "--quiet", "--select", f"{naming.staging_model(COLLAB, 'retailer', 'purchases')},test_name:dcr_only_columns",
            "--project-dir", str(project), "--profiles-dir", str(project)]
    passing = dbtRunner().invoke(args)
    assert passing.success and len(passing.result.results) == 1
    with psycopg.connect(e2e["url"], autocommit=True) as conn:
        conn.execute(f'alter table "{schema}".purchases add column customer_email text')
        try:
            failed = dbtRunner().invoke(args)
        finally:
            conn.execute(f'alter table "{schema}".purchases drop column customer_email')
    assert not failed.success
    assert re.search(r"dcr_only_columns", str([r.node.name for r in failed.result.results]))
