"""Shared fixtures: a real PostgreSQL (embedded by default, DCR_DATABASE_URL if set) and a deployment home."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcr_pipelines.lib.database import stop_embedded
from dcr_pipelines.lib.settings import PROJECT_ROOT

EXTERNAL_HOST, EXTERNAL_PORT = "127.0.0.1", 5432


def external_pg_available() -> bool:
    try:
        with socket.create_connection((EXTERNAL_HOST, EXTERNAL_PORT), timeout=1):
            return True
    except OSError:
        return False


def _database_per_worker() -> None:
    """Under pytest-xdist with DCR_DATABASE_URL set, each worker gets a database of its own (<name>_<worker>), so that
    workers never share Dagster's run storage or a collaboration's schemas. The embedded default is per worker already."""
    url, worker = os.environ.get("DCR_DATABASE_URL"), os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return
    import psycopg
    from psycopg import sql

    from dcr_pipelines.lib.database import Connection

    base = Connection.from_url(url)
    own = f"{base.dbname}_{worker}"
    with psycopg.connect(base.url("postgres"), autocommit=True) as conn:
        if conn.execute("select 1 from pg_database where datname = %s", (own,)).fetchone() is None:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(own)))
    os.environ["DCR_DATABASE_URL"] = base.url(own)


@pytest.fixture(scope="session")
def dcr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A deployment home for the whole test session; its embedded server is stopped afterwards."""
    home = tmp_path_factory.mktemp("dcr_home")
    saved = dict(os.environ)
    _database_per_worker()
    os.environ["DCR_HOME"] = str(home)
    os.environ["DCR_LANDING"] = str(home / "landing")
    os.environ["DCR_POLICIES"] = str(PROJECT_ROOT / "policies")
    os.environ["DCR_SETTLE_SECONDS"] = "0"  # tests write their files whole before they run; the settle test sets its own
    yield home
    stop_embedded(home)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def runtime(dcr_home: Path):  # type: ignore[no-untyped-def]
    from dcr_pipelines.lib.runtime import activate

    return activate()


@pytest.fixture()
def policies_copy(tmp_path: Path) -> Path:
    """A private copy of policies/ that a test may edit."""
    target = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", target)
    return target
