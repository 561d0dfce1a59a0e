"""Buckets as steps (matching.bucket_steps): in process, and spread over Celery workers with the Redis broker.

The ``buckets`` collaboration is the demo with three buckets, each its own
Dagster asset. In process, the cross-reference must equal the plain
intersection with each party's right token; a re-run does no PSI work.
Then the same job runs through `dagster job execute` with DCR_EXECUTOR=celery
and two Celery workers started here: the cross-reference must hold exactly
the same token pairs, and the workers' log must show they ran the steps.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.identifiers import token
from dcr_pipelines.lib.matching import bucket_of, bucket_sql
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize

from .conftest import land, make_collaboration

COLLAB = "buckets"
KEYS = {"retailer": "b0c4e7" * 10 + "abcd", "ad_network": "7e57ab" * 10 + "dcba"}
REDIS = ("127.0.0.1", 6379)


def _redis_available() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("bucket_policies")
    folder = make_collaboration(root, COLLAB, groups=24)
    path = folder / "collaboration.yaml"
    assert "  buckets: 2\n" in path.read_text()
    path.write_text(path.read_text().replace("  buckets: 2\n", "  buckets: 3\n  bucket_steps: true\n"))
    settings = dataclasses.replace(runtime.settings, policies=root)
    for party, key in KEYS.items():
        os.environ[secret_env_name("HMAC", COLLAB, party)] = key
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=1_200, overlap=0.4, seed=44)
    land(files, settings.landing, COLLAB)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return {"defs": defs, "files": files, "outcome": outcome, "url": runtime.warehouse.url(), "settings": settings, "root": root}


def _pairs(url: str) -> set[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return set(conn.execute(
            sql.SQL("select {}, {} from {}").format(
                sql.Identifier(naming.party_token_column("retailer")), sql.Identifier(naming.party_token_column("ad_network")),
                sql.Identifier(naming.matching_schema(COLLAB), "cross_reference"),
            )
        ).fetchall())


def _expected(files: demo_data.DemoFiles) -> set[tuple[str, str]]:
    def emails(path: Path, column: str) -> set[str]:
        return set(pd.read_csv(path)[column].str.strip().str.lower())

    shared = (emails(files.purchases, "customer_email") | emails(files.customers, "customer_email")) & emails(files.impressions, "user_email")
    return {(token(bytes.fromhex(KEYS["retailer"]), e), token(bytes.fromhex(KEYS["ad_network"]), e)) for e in shared}


def test_the_sql_bucket_is_the_python_bucket(runtime) -> None:  # type: ignore[no-untyped-def]
    ids = [f"user{i}@example.com" for i in range(2000)] + ["zoë@exämple.de", "李@example.cn", "+14155550100"]
    with psycopg.connect(runtime.warehouse.url()) as conn:
        for n in (2, 3, 7, 64):
            got = conn.execute(f"select i, {bucket_sql('v', n)} from unnest(%s::text[]) with ordinality as t(v, i) order by i", (ids,)).fetchall()
            assert [int(b) for _, b in got] == [bucket_of(x, n) for x in ids], n


def test_with_bucket_steps_the_identity_lists_hold_each_pairs_bucket_indexed(ctx: dict[str, Any]) -> None:
    """A bucket step reads its rows by index instead of hashing every identity again (work per step ~ its bucket)."""
    with psycopg.connect(ctx["url"]) as conn:
        for party in ("retailer", "ad_network"):
            table = sql.Identifier(naming.raw_schema(COLLAB, party), "identities")
            rows = conn.execute(sql.SQL("select identifier, bucket from {}").format(table)).fetchall()
            assert rows and all(int(b) == bucket_of(i, 3) for i, b in rows)
            indexes = conn.execute("select indexdef from pg_indexes where schemaname = %s and tablename = 'identities'",
                                   (naming.raw_schema(COLLAB, party),)).fetchall()
            assert any("(bucket)" in d for (d,) in indexes), indexes


def test_bucket_steps_give_the_plain_intersection_with_each_partys_token(ctx: dict[str, Any]) -> None:
    meta = ctx["outcome"].metadata
    per_bucket = [meta[f"{COLLAB}/matching/bucket_{b:03d}"]["matched"] for b in range(3)]
    expected = _expected(ctx["files"])
    assert len(expected) > 100 and all(n > 0 for n in per_bucket) and sum(per_bucket) == len(expected)
    assert _pairs(ctx["url"]) == expected


def test_a_rerun_does_no_psi_work_in_any_bucket(ctx: dict[str, Any]) -> None:
    again = materialize(ctx["defs"], collaboration_keys(ctx["defs"], COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert again.success, again.failure
    assert all(again.metadata[f"{COLLAB}/matching/bucket_{b:03d}"]["recomputed"] is False for b in range(3))
    assert again.metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is False


def test_a_bucket_matched_from_older_identities_is_refused_by_name_and_the_cross_reference_kept(ctx: dict[str, Any]) -> None:
    """The assembly streams the buckets and checks each against its bucket of the current identities; a stale one fails
    the step naming every stale bucket, and nothing of the new table is kept."""
    before = _pairs(ctx["url"])
    schema = naming.matching_schema(COLLAB)
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        conn.execute(sql.SQL("update {} set input_digest = 'older' where bucket in (0, 2)").format(sql.Identifier(schema, "bucket_builds")))
        conn.execute(sql.SQL("delete from {}").format(sql.Identifier(schema, "cross_reference_builds")))  # the step must assemble again
    outcome = materialize(ctx["defs"], [naming.cross_reference_key(COLLAB)], instance=dg.DagsterInstance.get())
    assert not outcome.success
    assert "bucket(s) 0, 2 were matched from other identities" in str(outcome.failure)
    assert _pairs(ctx["url"]) == before
    again = materialize(ctx["defs"], [naming.bucket_key(COLLAB, b) for b in (0, 2)] + [naming.cross_reference_key(COLLAB)],
                        instance=dg.DagsterInstance.get())
    assert again.success, again.failure
    assert _pairs(ctx["url"]) == before == _expected(ctx["files"])


def test_buckets_and_releases_spread_over_celery_workers_give_the_same_result(ctx: dict[str, Any], tmp_path: Path) -> None:
    if not _redis_available():
        pytest.skip(f"no Redis broker on {REDIS[0]}:{REDIS[1]} (the CI and development machines run one)")
    before = _pairs(ctx["url"])
    with psycopg.connect(ctx["url"], autocommit=True) as conn:  # forget the builds, so that every bucket is matched again
        for table in ("bucket_builds", "cross_reference_builds"):
            conn.execute(sql.SQL("delete from {}").format(sql.Identifier(naming.matching_schema(COLLAB), table)))
    broker = f"redis://{REDIS[0]}:{REDIS[1]}/11"
    config_dir = tmp_path / "celery_config"
    config_dir.mkdir()
    (config_dir / "dagster_celery_config.py").write_text(f"broker_url = {broker!r}\nresult_backend = {broker!r}\n")
    env = {**os.environ, "DCR_POLICIES": str(ctx["root"]), "DCR_EXECUTOR": "celery", "DCR_CELERY_BROKER": broker,
           "PYTHONPATH": os.pathsep.join([str(config_dir), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "workers.log"
    celery = str(Path(sys.executable).with_name("celery"))
    # Two workers of one process each (--pool solo): a PSI step starts a process per party's half,
    # which Celery's prefork pool (daemonic children) does not allow.
    workers = [
        subprocess.Popen(
            [celery, "-A", "dagster_celery.app", "worker", "-Q", "dagster", "--pool", "solo", "-l", "INFO", "-n", f"dcr-test-{i}-{os.getpid()}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--prefetch-multiplier=1"],
            env=env, stdout=(tmp_path / f"worker{i}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=tmp_path,  # not the checkout: a developer's `.env` there (written by `make demo`) names another deployment
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all("ready" in (tmp_path / f"worker{i}.log").read_text() for i in range(2)) and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers), (tmp_path / "worker0.log").read_text()[-3000:]
            time.sleep(0.5)
        dagster = str(Path(sys.executable).with_name("dagster"))
        run = subprocess.run([dagster, "job", "execute", "-m", "dcr_pipelines.definitions", "-a", "defs", "-j", f"{COLLAB}__all"],
                             env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        (tmp_path / "run.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0 and "RUN_SUCCESS" in run.stdout + run.stderr, (run.stdout + run.stderr)[-5000:]  # it exits 0 on a failed run
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
        log.write_text("".join((tmp_path / f"worker{i}.log").read_text() for i in range(2)))
    worker_log = log.read_text()
    succeeded = worker_log.count("succeeded in")
    assert succeeded >= 3 + 1 + 1, worker_log[-3000:]  # three buckets, the cross-reference, the release (and the rest)
    assert all(f"Executing steps buckets__matching__bucket_{b:03d}" in worker_log for b in range(3))
    assert all("succeeded in" in (tmp_path / f"worker{i}.log").read_text() for i in range(2)), "both workers took steps"
    assert _pairs(ctx["url"]) == before == _expected(ctx["files"])
    with psycopg.connect(ctx["url"]) as conn:
        rebuilt = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(naming.matching_schema(COLLAB), "bucket_builds"))).fetchone()[0]
    assert rebuilt == 3
