"""`dcr db drop COLLAB`: a collaboration's schemas, server-wide roles and bookkeeping go; every other collaboration's stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dcr_pipelines.lib import naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.store import access, ledger, stages
from dcr_pipelines.store import uploads as queue

from .conftest import make_collaboration

DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
GONE, KEPT = "drop_me", "drop_me_too"  # the kept one's names all start with the dropped one's: they must survive


def _state(conn: psycopg.Connection, collab: str) -> dict[str, Any]:
    """Everything of ``collab`` on the server: schemas, roles (exactly its own, whatever the other's names), dcr_meta rows."""
    loaded_roles = [r for (r,) in conn.execute("select rolname from pg_roles where rolname like %s order by 1", (f"dcr\\_{collab}\\_%",))]
    schemas = [s for (s,) in conn.execute("select nspname from pg_namespace where nspname like %s order by 1", (f"{collab}\\_%",))]
    other = KEPT if collab == GONE else None
    if other:  # the dropped collaboration's view must not count the other's names
        loaded_roles = [r for r in loaded_roles if not r.startswith(f"dcr_{other}_")]
        schemas = [s for s in schemas if not s.startswith(f"{other}_")]
    return {
        "schemas": schemas,
        "roles": loaded_roles,
        "stage_builds": conn.execute("select count(*) from dcr_meta.stage_builds where collaboration = %s", (collab,)).fetchone()[0],  # type: ignore[index]
        "uploads": conn.execute("select count(*) from dcr_meta.uploads where collaboration = %s", (collab,)).fetchone()[0],  # type: ignore[index]
        "migrations": conn.execute("select count(*) from dcr_meta.schema_migrations where scope = %s",
                                   (f"results:{naming.results_schema(collab)}",)).fetchone()[0],  # type: ignore[index]
    }


def _populate(conn: psycopg.Connection, folder: Path) -> None:
    loaded = load_collaboration(folder)
    access.apply(conn, loaded)  # schemas and roles, as the grants asset makes them
    ledger.ensure_tables(conn, naming.results_schema(loaded.name))  # the results tables, recorded in schema_migrations
    stages.record_build(conn, loaded.name, "staging", "digest")
    seq = queue.next_seq(conn)
    queue.register(conn, seq, loaded.name, "retailer", "purchases", "p.csv", checksum=None, size_bytes=1)
    raw = naming.raw_schema(loaded.name, "retailer")
    conn.execute(f'create table "{raw}".purchases (v int)')  # a table owned by the operator, in a party's schema
    # A party of an earlier policy version: its schema and role are the collaboration's too.
    conn.execute(f'create schema if not exists "{naming.raw_schema(loaded.name, "old_party")}"')
    conn.execute(f'create role "{access.role_name(loaded.name, "old_party", "raw_owner")}" nologin')
    conn.execute(f'grant usage on schema "{raw}" to "{access.role_name(loaded.name, "old_party", "raw_owner")}"')


def test_db_drop_removes_the_collaboration_and_nothing_else(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "policies"
    for name in (GONE, KEPT):
        make_collaboration(root, name, groups=3)
    url = runtime.warehouse.url()
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (GONE, KEPT):
            _populate(conn, root / name)
        before = {name: _state(conn, name) for name in (GONE, KEPT)}
    assert {naming.results_schema(GONE), naming.raw_schema(GONE, "old_party")} <= set(before[GONE]["schemas"])
    assert access.role_name(GONE, "admin") in before[GONE]["roles"] and before[GONE]["uploads"] == 1
    env = {**os.environ, "DCR_POLICIES": str(root)}

    asked = subprocess.run([*DCR, "db", "drop", GONE], capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert asked.returncode == 2 and len(asked.stderr.splitlines()) == 1, asked.stderr
    assert asked.stderr.startswith(f"error: dcr db drop {GONE} would drop ") and "add --yes" in asked.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        assert _state(conn, GONE) == before[GONE], "refused without --yes, yet something was dropped"

    done = subprocess.run([*DCR, "db", "drop", GONE, "--yes"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert f"{GONE}: dropped {len(before[GONE]['schemas'])} schemas, {len(before[GONE]['roles'])} roles" in done.stdout, done.stdout
    with psycopg.connect(url, autocommit=True) as conn:
        after = {name: _state(conn, name) for name in (GONE, KEPT)}
    assert after[GONE] == {"schemas": [], "roles": [], "stage_builds": 0, "uploads": 0, "migrations": 0}
    assert after[KEPT] == before[KEPT], "another collaboration lost something"

    again = subprocess.run([*DCR, "db", "drop", GONE, "--yes"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "nothing of drop_me in the database" in again.stdout, again.stderr
    unknown = subprocess.run([*DCR, "db", "drop", "never_was", "--yes"], capture_output=True, text=True, timeout=300, env=env)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no collaboration 'never_was'"), unknown.stderr


@pytest.mark.parametrize("name", ["Bad-Name", "../x"])
def test_db_drop_refuses_a_name_that_is_not_a_collaboration_name(name: str) -> None:
    proc = subprocess.run([*DCR, "db", "drop", name, "--yes"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {name!r} is not a collaboration name"), proc.stderr
