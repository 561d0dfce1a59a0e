"""Orchestration overhead per Dagster executor, on the demo collaboration.

    .venv/bin/python benchmarks/executors.py [--rows 10000]

Sets up the ``bench`` collaboration as benchmarks/end_to_end.py does and runs
its whole job once in-process to load the data. Then, for each executor,
through `dagster job execute` (a fresh process, as a deployment would):

- a no-op run: nothing changed, so every step skips its work; what is left is
  the executor's cost (process starts, definitions loading, event writes);
- a full run: the stage and match records are cleared first, so dbt and PSI
  run again (releases are identical and come from the store).

Executors: in_process; multiprocess (Dagster's default: a spawned process
per step, 2 at a time); multiprocess with the forkserver start method. The
in-process runner `dcr` itself uses (dg.materialize in the calling process)
is measured too. Writes ``benchmarks/results/executors.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from end_to_end import COLLAB, _run, prepare

EXECUTORS: dict[str, dict[str, Any]] = {
    "in_process": {"in_process": {}},
    "multiprocess": {"multiprocess": {"max_concurrent": 2}},
    "multiprocess_forkserver": {"multiprocess": {"max_concurrent": 2, "start_method": {"forkserver": {}}}},
}


def _reset(url: str) -> None:
    """Forget the stage and match records, so that the next run rebuilds dbt stages and re-runs PSI."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("delete from dcr_meta.stage_builds where collaboration = %s", (COLLAB,))
        conn.execute(f"delete from {COLLAB}_matching.cross_reference_builds")


def _execute(config: dict[str, Any], workdir: Path) -> float:
    cfg = workdir / "run_config.json"
    cfg.write_text(json.dumps({"execution": {"config": config}}))
    dagster = str(Path(sys.executable).with_name("dagster"))
    started = time.perf_counter()
    proc = subprocess.run([dagster, "job", "execute", "-m", "dcr_pipelines.definitions", "-a", "defs", "-j", f"{COLLAB}__all", "-c", str(cfg)],
                          capture_output=True, text=True, env={**os.environ, "DCR_EXECUTOR": "multiprocess"})  # Dagster's default: the run config picks
    wall = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "RUN_SUCCESS" not in output:
        raise SystemExit(f"run failed:\n{output[-4000:]}")
    return round(wall, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows per party")
    args = parser.parse_args()

    from dcr_pipelines.definitions import build_definitions
    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.settings import PROJECT_ROOT
    from dcr_pipelines.runner import collaboration_keys

    home, runtime, settings, _files, _land = prepare(args.rows)
    work = Path(tempfile.mkdtemp(prefix="dcr-exec-"))
    try:
        defs = build_definitions(settings)
        keys = collaboration_keys(defs, COLLAB, releases=True)
        first = _run(defs, COLLAB, "load (in-process runner)")
        noop = _run(defs, COLLAB, "no-op (in-process runner)")
        _reset(runtime.warehouse.url())
        full = _run(defs, COLLAB, "full (in-process runner)")
        results: dict[str, Any] = {"dcr_runner_in_calling_process": {"noop_s": noop["wall_s"], "full_s": full["wall_s"], "first_load_s": first["wall_s"]}}
        for name, config in EXECUTORS.items():
            noop_s = _execute(config, work)
            _reset(runtime.warehouse.url())
            full_s = _execute(config, work)
            results[name] = {"noop_s": noop_s, "full_s": full_s}
            print(f"{name}: no-op {noop_s:.1f} s, full {full_s:.1f} s", flush=True)
        base = results["in_process"]
        for r in results.values():
            r["noop_ratio_to_in_process"] = round(r["noop_s"] / base["noop_s"], 2)
            r["full_ratio_to_in_process"] = round(r["full_s"] / base["full_s"], 2)
        out = PROJECT_ROOT / "benchmarks" / "results" / "executors.json"
        report = {"rows_per_party": args.rows, "assets": len(keys),
                  "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
                  "executors": results}
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        print(f"written to {out}")
    finally:
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
