"""The demo collaboration end to end against the same job without privacy.

    .venv/bin/python benchmarks/end_to_end.py [--rows 100000]

On a fresh embedded PostgreSQL under a temporary DCR_HOME:

1. full run: every asset of a copy of ``policies/demo`` materialized in-process
   through Dagster (ingest + validation, dbt staging, PSI matching, dbt
   analysis, the three releases), with each step's wall time;
2. re-run with nothing changed;
3. re-run after 1% new rows: the ad network appends a file of new impressions
   (append mode: one upload partition, validated alone);
4. the same three runs again in a second copy with ``matching.key_epoch: 7d``
   (keys and blinded sets kept: only new identities are blinded);
5. the no-privacy baseline on the same data and database: COPY the three
   files, join on the plain normalised email, compute the same aggregates in SQL.

``--scale`` (for 10M rows and more) runs only the full run, the re-run with
nothing changed and the baseline, in the ``bench`` copy (fresh keys); a key
epoch at that size is measured by ``benchmarks/key_epoch.py``.

Writes ``benchmarks/results/end_to_end_<rows>.json``, with each dbt model's own duration in each run
(``dbt_models_s``: where the staging time goes). Peak memory is sampled
every 0.2 s during each run: the largest single process (the run's own, or a
PSI party process) and the whole tree; the PostgreSQL server is not included
(it is not a child of this process: its sorts and hash joins spill to disk).
Demo data is generated before the runs and outside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

COLLAB = "bench"

BASELINE_SQL = """
drop schema if exists plain cascade;
create schema plain;
create table plain.purchases (customer_email text, purchase_value numeric, purchase_date date, store_region text);
create table plain.impressions (user_email text, campaign_id text, impression_time timestamp);
create table plain.customers (customer_email text, loyalty_tier text, age_band text, lifetime_value numeric);
"""

BASELINE_QUERIES = {
    "campaign_reach": """
        with exposed as (select distinct lower(trim(user_email)) as email, campaign_id from plain.impressions
                         where impression_time >= '2026-01-01'),
             spend as (select lower(trim(customer_email)) as email, store_region, sum(purchase_value) as spend
                       from plain.purchases where purchase_date >= '2026-01-01' group by 1, 2)
        select campaign_id, store_region, count(distinct exposed.email), sum(least(greatest(spend, 0), 300))
        from exposed join spend using (email) group by 1, 2""",
    "region_spend": """
        with exposed as (select distinct lower(trim(user_email)) as email from plain.impressions where impression_time >= '2026-01-01')
        select store_region, count(distinct email), sum(least(greatest(spend, 0), 500)) from (
            select lower(trim(customer_email)) as email, store_region, sum(purchase_value) as spend
            from plain.purchases where purchase_date >= '2026-01-01' group by 1, 2) s
        join exposed using (email) group by 1""",
    "tier_reach": """
        select campaign_id, loyalty_tier, count(distinct email), avg(least(greatest(lifetime_value, 0), 5000)) from (
            select distinct lower(trim(user_email)) as email, campaign_id from plain.impressions where impression_time >= '2026-01-01') e
        join (select lower(trim(customer_email)) as email, loyalty_tier, lifetime_value from plain.customers) c using (email)
        group by 1, 2 having count(distinct email) >= 25""",
}


def _peak_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"this_process_mb": round(own, 1), "largest_child_mb": round(children, 1)}


class MemorySampler:
    """Peak RSS while the block runs of this process and its descendants (PSI party processes): the largest one and
    their sum; the embedded PostgreSQL, a descendant too, is reported on its own (its RSS counts shared buffers)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._me, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self.largest_mb = self.tree_mb = self.postgres_mb = 0.0
        self.largest_name = ""
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            sizes, postgres = [], 0.0
            for proc in [self._me, *self._me.children(recursive=True)]:
                try:
                    rss, name = proc.memory_info().rss / 2**20, proc.name()
                except psutil.Error:
                    continue
                if name.startswith("postgres"):
                    postgres = max(postgres, rss)
                    continue
                sizes.append(rss)
                if rss > self.largest_mb:
                    self.largest_mb, self.largest_name = rss, "this process" if proc.pid == self._me.pid else " ".join(proc.cmdline()[-2:])[:60]
            self.tree_mb, self.postgres_mb = max(self.tree_mb, sum(sizes)), max(self.postgres_mb, postgres)
            self._stop.wait(self._interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _stage_times(instance: Any, run_id: str, collab: str) -> dict[str, float]:
    stats = instance.get_run_step_stats(run_id)
    return {s.step_key.removeprefix(f"{collab}__"): round((s.end_time or 0) - (s.start_time or 0), 2) for s in stats if s.end_time}


def _model_times(instance: Any, run_id: str, collab: str) -> dict[str, float]:
    """Each dbt model's own duration in the run (dagster-dbt's "Execution Duration"; models run two at a time)."""
    import dagster as dg

    out = {}
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
        materialization = record.event_log_entry.asset_materialization
        duration = materialization.metadata.get("Execution Duration") if materialization else None
        if duration is not None:
            out["/".join(materialization.asset_key.path[1:])] = round(float(duration.value), 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _run(defs: Any, collab: str, label: str) -> dict[str, Any]:
    """What `dcr run --release` does: one run per waiting append-mode upload, then one run of the rest."""
    import dagster as dg

    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.runner import analysis_run_config, collaboration_keys, ingest_uploads, materialize

    instance = dg.DagsterInstance.get()
    log = Path(os.environ["DCR_HOME"]) / "logs" / "runs.log"  # dbt output off the terminal
    loaded = load_collaboration(Path(os.environ["DCR_POLICIES"]) / collab)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    with MemorySampler() as memory:
        for upload in ingest_uploads(defs, loaded, Path(os.environ["DCR_LANDING"]), os.environ["DCR_WAREHOUSE_URL"], instance=instance, stdout_log=log):
            if not upload.success:
                raise SystemExit(f"{label} failed: {upload.failure}")
            for k, v in _stage_times(instance, upload.run_id, collab).items():
                stages[k] = round(stages.get(k, 0.0) + v, 2)
        outcome = materialize(defs, collaboration_keys(defs, collab, releases=True), instance=instance,
                              run_config=analysis_run_config(collab, {}), stdout_log=log)
    wall = time.perf_counter() - started
    if not outcome.success:
        raise SystemExit(f"{label} failed: {outcome.failure}")
    stages.update(_stage_times(instance, outcome.run_id, collab))
    models = _model_times(instance, outcome.run_id, collab)
    peak = {"largest_process_mb": round(memory.largest_mb, 1), "largest_process": memory.largest_name,
            "process_tree_mb": round(memory.tree_mb, 1), "largest_postgres_process_mb": round(memory.postgres_mb, 1)}
    print(f"{label}: {wall:.1f} s  " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + f"  peak {peak}", flush=True)
    return {"wall_s": round(wall, 2), "stages_s": stages, **({"dbt_models_s": models} if models else {}), "peak_memory": peak}


def _baseline(url: str, files: Any) -> dict[str, Any]:
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(BASELINE_SQL)
        for table, path in (("purchases", files.purchases), ("impressions", files.impressions), ("customers", files.customers)):
            with conn.cursor().copy(f"copy plain.{table} from stdin with (format csv, header true)") as copy, path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    copy.write(chunk)
        loaded = time.perf_counter() - started
        times = {}
        for name, query in BASELINE_QUERIES.items():
            t = time.perf_counter()
            conn.execute(query).fetchall()
            times[name] = round(time.perf_counter() - t, 3)
        conn.execute("drop schema plain cascade")
    total = time.perf_counter() - started
    print(f"baseline (no privacy): {total:.1f} s (load {loaded:.1f} s, queries {times})", flush=True)
    return {"wall_s": round(total, 2), "load_s": round(loaded, 2), "queries_s": times}


EPOCH_COLLAB = "bench_epoch"


def prepare(rows: int, scale: bool = False) -> tuple[Path, Any, Any, Any, Any]:
    """A temporary DCR_HOME with the embedded PostgreSQL, two copies of the demo (``bench``: fresh PSI keys every run;
    ``bench_epoch``: a 7-day key epoch) and their generated, landed uploads."""
    home = Path(tempfile.mkdtemp(prefix="dcr-bench-"))
    os.environ["DCR_HOME"] = str(home)
    os.environ.pop("DCR_DATABASE_URL", None)
    from dcr_pipelines.definitions import secret_names
    from dcr_pipelines.lib import demo_data
    from dcr_pipelines.lib.policy.approve import approve_all
    from dcr_pipelines.lib.runtime import activate, ensure_development_secrets
    from dcr_pipelines.lib.settings import PROJECT_ROOT

    runtime = activate()
    policies = home / "policies"
    copies = ((COLLAB, "run"),) if scale else ((COLLAB, "run"), (EPOCH_COLLAB, "7d"))
    for collab, epoch in copies:
        shutil.copytree(PROJECT_ROOT / "policies" / "demo", policies / collab)
        collab_file = policies / collab / "collaboration.yaml"
        # A large budget (the benchmark releases repeatedly); every party approves the copy's looser protections,
        # as a real collaboration would have to.
        collab_file.write_text(collab_file.read_text().replace("name: demo", f"name: {collab}").replace("epsilon: 10.0", "epsilon: 1000.0")
                               .replace("  padding: false\n", f"  padding: false\n  key_epoch: {epoch}\n"))
        assert f"key_epoch: {epoch}" in collab_file.read_text()
        approve_all(policies / collab)
    settings = dataclasses.replace(runtime.settings, policies=policies)
    os.environ["DCR_POLICIES"] = str(policies)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(home / "generated", rows=rows, overlap=0.3, seed=7)

    def land(paths: list[Path]) -> None:
        for collab, _ in copies:
            for path in paths:
                target = settings.landing / collab / path.parent.parent.name / path.parent.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    land(list(files.uploads))
    return home, runtime, settings, files, land


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per party")
    parser.add_argument("--keep", action="store_true", help="keep the temporary DCR_HOME")
    parser.add_argument("--scale", action="store_true", help="full run, unchanged re-run and baseline only (10M rows and more)")
    args = parser.parse_args()

    from dcr_pipelines.definitions import build_definitions
    from dcr_pipelines.lib import demo_data
    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.settings import PROJECT_ROOT

    home, runtime, settings, files, land = prepare(args.rows, args.scale)
    try:
        defs = build_definitions(settings)
        # 1% new rows for the ad network: a second impressions file (new impressions of existing and new users)
        extra = max(1, args.rows // 100)
        more = demo_data.generate(home / "more", rows=extra * 2, overlap=0.3, seed=99)
        appended = files.impressions.with_name("impressions_more.csv")
        with more.impressions.open() as new, appended.open("w") as handle:
            handle.write(next(new))
            for _, line in zip(range(extra), new, strict=False):
                handle.write(line)
        runs: dict[str, Any] = {}
        if args.scale:
            full_run = _run(defs, COLLAB, "full run")
            matched = _matching_metadata(COLLAB)  # the full run's match (the re-run records no work buckets)
            runs[COLLAB] = {"full_run": full_run, "matching": matched, "rerun_unchanged": _run(defs, COLLAB, "re-run, nothing changed")}
        for collab in () if args.scale else (COLLAB, EPOCH_COLLAB):
            tag = "" if collab == COLLAB else " (key epoch 7d)"
            full = _run(defs, collab, "full run" + tag)
            again = _run(defs, collab, "re-run, nothing changed" + tag)
            land_one(settings, collab, appended)
            incremental = _run(defs, collab, "re-run after 1% new impressions" + tag)
            runs[collab] = {"full_run": full, "rerun_unchanged": again, "rerun_after_1pct_new_rows": incremental,
                            "ratio_1pct_rerun_to_full": round(incremental["wall_s"] / full["wall_s"], 3)}
        baseline = _baseline(runtime.warehouse.url(), files)
        full = runs[COLLAB]["full_run"]
        matching = full["stages_s"].get("matching__cross_reference", 0.0)
        result = {
            "rows_per_party": args.rows,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            **runs[COLLAB],
            **({} if args.scale else {"key_epoch_7d": runs[EPOCH_COLLAB]}),
            "baseline_no_privacy": baseline,
            "ratio_total_to_baseline": round(full["wall_s"] / baseline["wall_s"], 2),
            "ratio_total_minus_matching_to_baseline": round((full["wall_s"] - matching) / baseline["wall_s"], 2),
            **({} if args.scale else {
                "ratio_1pct_rerun_to_full": runs[COLLAB]["ratio_1pct_rerun_to_full"],
                "ratio_1pct_rerun_to_full_key_epoch": runs[EPOCH_COLLAB]["ratio_1pct_rerun_to_full"]}),
            "peak_memory": {**full["peak_memory"], "max_rss_over_the_script": _peak_mb()},
        }
        out = PROJECT_ROOT / "benchmarks" / "results" / f"end_to_end_{args.rows}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "peak"))}, indent=2))
        print(f"written to {out}")
    finally:
        stop_embedded(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


def _matching_metadata(collab: str) -> dict[str, Any]:
    """What the last cross-reference materialization recorded: buckets worked in, matched, rows per party."""
    import dagster as dg

    from dcr_pipelines.lib import naming

    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey(naming.cross_reference_key(collab)))
    meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
    return {k: getattr(v, "value", v) for k, v in meta.items() if k in ("work_buckets", "matched", "buckets", "bytes_exchanged") or k.startswith("input_rows")}


def land_one(settings: Any, collab: str, path: Path) -> None:
    """Land one more file for the ad network's impressions (append mode: it becomes its own upload partition)."""
    target = settings.landing / collab / "ad_network" / "impressions" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)


if __name__ == "__main__":
    main()
