"""Matching buckets and dbt stages on two Celery workers, against the same job in one process.

    .venv/bin/python benchmarks/celery_buckets.py [--rows 200000] [--buckets 8]

Sets up the ``bench`` copy of the demo as benchmarks/end_to_end.py does, with
``matching.bucket_steps: true`` and ``--buckets`` buckets, so every bucket's
PSI is a Dagster step of its own. Loads the data once in-process, then runs
the whole job twice through `dagster job execute` (a fresh process, as a
deployment would), each time after clearing the stage and match records so
that dbt and every bucket's PSI run again:

1. ``DCR_EXECUTOR=in_process``: every step in the run's process, one at a time;
2. ``DCR_EXECUTOR=celery`` with two Celery workers (``--pool solo``, one step
   at a time each) started here on the Redis broker at 127.0.0.1:6379.

Prints and writes to ``benchmarks/results/celery_buckets.json``: each run's
wall time and their ratio, every step's duration and the worker that ran it
(from the workers' own logs), and the per-bucket figures (identities per
party, seconds, core-seconds per million identities) that the 100M estimate
in docs/operations.md starts from. On this 2-core machine the two workers
share the cores the in-process run has: what the Celery run shows is that
the buckets and the dbt stages spread over workers and give the same
cross-reference, and what each step costs on a worker. Without a Redis
broker there it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from end_to_end import COLLAB, _run, prepare

REDIS = ("127.0.0.1", 6379)


def _redis_available() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _reset(url: str) -> None:
    """Forget the stage, bucket and match records, so that the next run rebuilds dbt stages and re-runs every bucket's PSI."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("delete from dcr_meta.stage_builds where collaboration = %s", (COLLAB,))
        for table in ("bucket_builds", "cross_reference_builds"):
            conn.execute(f"delete from {COLLAB}_matching.{table}")


def _pairs(url: str) -> set[tuple[str, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return set(conn.execute(f"select retailer_token, ad_network_token from {COLLAB}_matching.cross_reference").fetchall())


def _execute(env: dict[str, str]) -> tuple[float, str]:
    """One run of the job through `dagster job execute`; its wall time and its run id."""
    import dagster as dg

    dagster = str(Path(sys.executable).with_name("dagster"))
    started = time.perf_counter()
    proc = subprocess.run([dagster, "job", "execute", "-m", "dcr_pipelines.definitions", "-a", "defs", "-j", f"{COLLAB}__all"],
                          capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "RUN_SUCCESS" not in output:
        raise SystemExit(f"run failed:\n{output[-4000:]}")
    runs = dg.DagsterInstance.get().get_runs(limit=1)
    return round(wall, 2), runs[0].run_id


def _steps(run_id: str) -> dict[str, float]:
    import dagster as dg

    stats = dg.DagsterInstance.get().get_run_step_stats(run_id)
    return {s.step_key.removeprefix(f"{COLLAB}__"): round((s.end_time or 0) - (s.start_time or 0), 2) for s in stats if s.end_time}


def _start_workers(env: dict[str, str], logs: Path) -> list[subprocess.Popen[bytes]]:
    celery = str(Path(sys.executable).with_name("celery"))
    workers = [
        subprocess.Popen(
            [celery, "-A", "dagster_celery.app", "worker", "-Q", "dagster", "--pool", "solo", "-l", "INFO", "-n", f"dcr-bench-{i}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--prefetch-multiplier=1"],
            env=env, stdout=(logs / f"worker{i}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all("ready" in (logs / f"worker{i}.log").read_text() for i in range(2)):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            raise SystemExit("the Celery workers did not start:\n" + (logs / "worker0.log").read_text()[-3000:])
        time.sleep(0.5)
    return workers


def _steps_by_worker(logs: Path) -> dict[str, list[str]]:
    """Which steps each worker executed, from the lines dagster-celery logs as it starts a step."""
    out = {}
    for i in range(2):
        text = (logs / f"worker{i}.log").read_text()
        out[f"worker{i}"] = sorted({m.removeprefix(f"{COLLAB}__") for m in re.findall(r"Executing steps ([\w]+)", text)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per party")
    parser.add_argument("--buckets", type=int, default=8, help="matching buckets, each its own step")
    args = parser.parse_args()
    if not _redis_available():
        print(f"no Redis broker on {REDIS[0]}:{REDIS[1]}: the Celery benchmark needs one (the development and CI machines run one); skipped")
        return

    import dagster as dg

    from dcr_pipelines.definitions import build_definitions
    from dcr_pipelines.lib import naming
    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.settings import PROJECT_ROOT

    home, runtime, settings, _files, _land = prepare(args.rows, scale=True)
    collab_file = settings.policies / COLLAB / "collaboration.yaml"
    text = collab_file.read_text()
    assert "  buckets: 2\n" in text
    collab_file.write_text(text.replace("  buckets: 2\n", f"  buckets: {args.buckets}\n  bucket_steps: true\n"))
    work = Path(tempfile.mkdtemp(prefix="dcr-celery-"))
    broker = f"redis://{REDIS[0]}:{REDIS[1]}/12"
    (work / "dagster_celery_config.py").write_text(f"broker_url = {broker!r}\nresult_backend = {broker!r}\n")
    env = {**os.environ, "DCR_CELERY_BROKER": broker, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        defs = build_definitions(settings)
        _run(defs, COLLAB, "load (in-process runner)")
        url = runtime.warehouse.url()
        expected = _pairs(url)
        _reset(url)
        in_process_s, in_process_run = _execute({**env, "DCR_EXECUTOR": "in_process"})
        print(f"dagster job execute, in_process: {in_process_s:.1f} s", flush=True)
        assert _pairs(url) == expected
        workers = _start_workers(env, work)
        _reset(url)
        celery_s, celery_run = _execute({**env, "DCR_EXECUTOR": "celery"})
        print(f"dagster job execute, celery (2 workers): {celery_s:.1f} s", flush=True)
        assert _pairs(url) == expected, "the Celery run's cross-reference differs from the in-process one"
        by_worker = _steps_by_worker(work)
        celery_steps, in_process_steps = _steps(celery_run), _steps(in_process_run)
        bucket_steps = {k: v for k, v in celery_steps.items() if k.startswith("matching__bucket_")}
        instance = dg.DagsterInstance.get()
        per_bucket = []
        for b in range(args.buckets):
            event = instance.get_latest_materialization_event(dg.AssetKey(naming.bucket_key(COLLAB, b)))
            meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
            identities = {k.removeprefix("input_rows_"): int(getattr(v, "value", v)) for k, v in meta.items() if k.startswith("input_rows_")}
            per_bucket.append({"bucket": b, "identities": identities, "seconds_on_a_worker": bucket_steps.get(f"matching__bucket_{b:03d}"),
                               "seconds_in_process": in_process_steps.get(f"matching__bucket_{b:03d}")})
        per_party_ids = sum(max(b["identities"].values(), default=0) for b in per_bucket)
        worker_psi = sum(b["seconds_on_a_worker"] or 0 for b in per_bucket)
        report = {
            "rows_per_party": args.rows, "buckets": args.buckets,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            "in_process_s": in_process_s, "celery_two_workers_s": celery_s, "ratio_celery_to_in_process": round(celery_s / in_process_s, 2),
            "same_cross_reference": True,
            "steps_by_worker": by_worker,
            "both_workers_ran_bucket_steps": all(any(s.startswith("matching__bucket_") for s in steps) for steps in by_worker.values()),
            "dbt_stages_on_workers": sorted(s for steps in by_worker.values() for s in steps if s in ("staging", "analysis")),
            "celery_step_seconds": celery_steps, "in_process_step_seconds": in_process_steps,
            "per_bucket": per_bucket,
            # a bucket step's two halves (client and server process) alternate: its wall seconds are about one core's
            "psi_seconds_on_one_core_per_million_identities_per_party": round(worker_psi / max(per_party_ids, 1) * 1e6, 1),
        }
        out = PROJECT_ROOT / "benchmarks" / "results" / "celery_buckets.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: report[k] for k in ("in_process_s", "celery_two_workers_s", "ratio_celery_to_in_process", "steps_by_worker",
                                                 "dbt_stages_on_workers", "psi_seconds_on_one_core_per_million_identities_per_party")}, indent=2))
        print(f"written to {out}")
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
