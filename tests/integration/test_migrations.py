"""Versioned migrations against a real PostgreSQL: applied once, recorded with their hash, an edited one refused."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from dcr_pipelines.store import migrations


@pytest.fixture()
def conn(runtime):  # type: ignore[no-untyped-def]
    with psycopg.connect(runtime.warehouse.url(), autocommit=True) as c:
        yield c


def test_each_migration_is_applied_once_and_recorded(conn: psycopg.Connection) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}_results"
    first = migrations.ensure(conn, "results", schema)
    assert [a.version for a in first] == [m.version for m in migrations.migrations("results")]
    assert migrations.ensure(conn, "results", schema) == []  # up to date: nothing applied again
    assert conn.execute("select to_regclass(%s)", (f"{schema}.budget_ledger",)).fetchone()[0] is not None
    assert any(s == f"results:{schema}" for s, *_ in migrations.status(conn))


def test_a_migration_edited_after_it_was_applied_is_refused(conn: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = f"mig_{uuid.uuid4().hex[:8]}_analysis"
    migrations.ensure(conn, "analysis", schema)
    edited = tmp_path / "migrations"
    shutil.copytree(migrations.FOLDER, edited)
    path = edited / "analysis" / "0001_baseline.sql"
    path.write_text(path.read_text() + "\n-- an edit after the fact\n")
    monkeypatch.setattr(migrations, "FOLDER", edited)
    migrations.migrations.cache_clear()
    try:
        with pytest.raises(migrations.MigrationError, match=r"0001_baseline.sql changed after it was applied"):
            migrations.ensure(conn, "analysis", schema)
    finally:
        migrations.migrations.cache_clear()
