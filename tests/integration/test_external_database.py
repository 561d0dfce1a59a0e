"""The same `dcr demo` against an external PostgreSQL chosen with DCR_DATABASE_URL (the server on 127.0.0.1:5432)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.conftest import EXTERNAL_HOST, EXTERNAL_PORT, external_pg_available

pytestmark = [
    pytest.mark.external_pg,
    pytest.mark.slow,
    pytest.mark.skipif(not external_pg_available(), reason=f"no PostgreSQL listening on {EXTERNAL_HOST}:{EXTERNAL_PORT}"),
]


@pytest.fixture()
def external_url() -> str:
    admin = f"postgresql://postgres@{EXTERNAL_HOST}:{EXTERNAL_PORT}/postgres"
    name = f"dcr_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    yield f"postgresql://postgres@{EXTERNAL_HOST}:{EXTERNAL_PORT}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def test_dcr_demo_runs_on_the_external_database(external_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "DCR_DATABASE_URL": external_url, "DCR_HOME": str(tmp_path / "home"), "DCR_DEV_SECRETS": "1"}
    env.pop("DCR_LANDING", None)
    dcr = [sys.executable, "-m", "dcr_pipelines.cli"]
    proc = subprocess.run([*dcr, "demo", "--rows", "600"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epsilon of this release" in proc.stdout
    assert not (tmp_path / "home" / "pg").exists(), "no embedded server when an external URL is given"
    with psycopg.connect(external_url) as conn:
        version = conn.execute("show server_version_num").fetchone()[0]
        releases = conn.execute("select count(*) from demo_results.releases where query_name <> 'overlap' and query_name not like 'ad\\_hoc\\_\\_%'").fetchone()[0]
        ad_hoc = conn.execute("select count(*) from demo_results.releases where query_name = 'ad_hoc__ad_network'").fetchone()[0]
        dagster_runs = conn.execute("select count(*) from runs").fetchone()[0]
    assert releases == 3  # the demo's three approved queries
    assert ad_hoc == 1  # and its differentially private ad-hoc example
    assert dagster_runs >= 1, "Dagster's run storage lives in the same external database"
    url = subprocess.run([*dcr, "db", "url"], env=env, capture_output=True, text=True)
    assert f"{EXTERNAL_HOST}:{EXTERNAL_PORT}" in url.stdout
    assert int(version) >= 120000


def test_a_leftover_secrets_file_is_never_used_with_an_external_database(external_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "secrets.env").write_text("DCR_SECRET__PAIRING__DEMO=" + "ab" * 32 + "\n")  # left by an earlier embedded run
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCR_SECRET__") and k not in ("DCR_DEV_SECRETS", "DCR_LANDING")}
    env.update({"DCR_DATABASE_URL": external_url, "DCR_HOME": str(home)})
    proc = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "run", "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: secret DCR_SECRET__") and "is not set" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
