"""What difference checks cost: ad-hoc queries with and without them at the demo size, and the check itself at 1M people.

    .venv/bin/python benchmarks/difference_checks.py [--rows 10000] [--people 1000000] [--rounds 7]

1. Demo size: a copy of ``policies/demo`` materialized on a fresh embedded
   PostgreSQL; eight representative ad-hoc queries run through
   ``ad_hoc_service.execute`` (what the Dagster asset calls) alternately with the
   difference checks on and off, ``--rounds`` times each. The history grows
   as it would in use (every checked run records its rows). Reported: the
   median time per query each way and their ratio (target: at most 2).
2. At ``--people``: one group of that many people. Reported: collecting the
   people set in phase 1 (``array_agg`` and the transfer) against counting
   them only, checking a row against a history of 20 rows of about that size
   (one of them a single person away, so the exact comparison runs), and
   recording a row; with the bytes a row keeps.

Writes ``benchmarks/results/difference_checks.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import end_to_end

JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"
QUERIES = [
    f"select c.loyalty_tier, count(distinct c.customer_email) as buyers, round(avg(c.lifetime_value), 2) as value {JOIN} group by 1",
    f"select i.campaign_id, c.loyalty_tier, count(*) as impressions {JOIN} group by 1, 2",
    f"select c.age_band, sum(c.lifetime_value) as value {JOIN} where i.impression_time >= '2026-03-01' group by 1",
    f"select date_trunc('month', i.impression_time) as month, count(distinct c.customer_email) {JOIN} group by 1 order by 1",
    "select i.campaign_id, count(*) as impressions, count(distinct i.user_email) as people from impressions as i group by 1",
    "select extract(dow from i.impression_time) as weekday, count(*) from impressions as i group by 1",
    f"select count(distinct c.customer_email) as shared {JOIN}",
    f"select c.loyalty_tier, c.age_band, count(*) {JOIN} where c.age_band in ('18-24', '25-34') group by 1, 2",
]


def staged_now(conn: Any, loaded: Any) -> Any:
    """What the staged data were built from, as Dagster's event log records it (the gate's input)."""
    import dagster as dg

    from dcr_pipelines.defs import freshness

    return freshness.staged(dg.DagsterInstance.get(), conn, loaded)



def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def demo_size(rows: int, rounds: int) -> dict[str, Any]:
    import dagster as dg
    import psycopg

    from dcr_pipelines.definitions import build_definitions
    from dcr_pipelines.lib import ad_hoc
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.lib.policy.models import DifferenceChecks
    from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
    from dcr_pipelines.services import ad_hoc as ad_hoc_service

    home, runtime, settings, _, _ = end_to_end.prepare(rows)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, end_to_end.COLLAB, releases=True), instance=dg.DagsterInstance.get(),
                          run_config=analysis_run_config(end_to_end.COLLAB, {}), stdout_log=home / "logs" / "runs.log")
    if not outcome.success:
        raise SystemExit(f"pipeline failed: {outcome.failure}")
    on = load_collaboration(settings.policies / end_to_end.COLLAB)
    off = dataclasses.replace(on, collaboration=on.collaboration.model_copy(update={"difference_checks": DifferenceChecks(enabled=False)}))
    times: dict[str, list[float]] = {"checked": [], "unchecked": []}
    withheld = 0
    with psycopg.connect(runtime.warehouse.url(), autocommit=True) as conn:
        n = 0
        for r in range(rounds):
            for text in QUERIES:
                order = [("checked", on), ("unchecked", off)] if (r + n) % 2 == 0 else [("unchecked", off), ("checked", on)]
                for label, loaded in order:
                    n += 1
                    checked = ad_hoc.check(loaded, "ad_network", text)
                    result: list[Any] = []
                    times[label].append(_timed(lambda loaded=loaded, checked=checked, n=n, text=text, result=result: result.append(  # type: ignore[misc]
                        ad_hoc_service.execute(conn, loaded, checked, f"bench-{n}", text, staged_now(conn, loaded)))))
                    withheld += result[0].suppressed if label == "checked" else 0
        history = conn.execute("select count(*), coalesce(sum(length(people)), 0) from dcr_meta.released_people").fetchone()
    checked_ms, unchecked_ms = (statistics.median(times[k]) * 1000 for k in ("checked", "unchecked"))
    out = {
        "rows_per_party": rows, "queries": len(QUERIES), "rounds": rounds,
        "median_ms_checked": round(checked_ms, 2), "median_ms_unchecked": round(unchecked_ms, 2),
        "ratio_checked_to_unchecked": round(checked_ms / unchecked_ms, 2),
        "rows_withheld_in_checked_runs": withheld, "history_rows": int(history[0]), "history_bytes": int(history[1]),
    }
    print(f"demo size ({rows} rows per party): {checked_ms:.1f} ms checked vs {unchecked_ms:.1f} ms unchecked per query, "
          f"ratio {out['ratio_checked_to_unchecked']}", flush=True)
    from dcr_pipelines.lib.database import stop_embedded

    stop_embedded(home)
    shutil.rmtree(home, ignore_errors=True)
    return out


def at_scale(people: int) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import psycopg

    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.privacy import difference
    from dcr_pipelines.lib.runtime import activate
    from dcr_pipelines.store import footprints

    home = Path(tempfile.mkdtemp(prefix="dcr-bench-diff-"))
    os.environ["DCR_HOME"] = str(home)
    runtime = activate()
    rng = np.random.default_rng(1)
    collab = "scale"
    try:
        with psycopg.connect(runtime.warehouse.url(), autocommit=True) as conn:
            units = np.unique(rng.integers(-(2**63), 2**63 - 1, size=people, dtype=np.int64))
            conn.execute("create table people (unit bigint not null)")
            with conn.cursor().copy("copy people (unit) from stdin") as copy:
                for u in units.tolist():
                    copy.write_row((u,))
            conn.execute("analyze people")
            count_only = min(_timed(lambda: conn.execute("select count(distinct unit) from people").fetchall()) for _ in range(3))
            collected: list[Any] = []
            with_people = min(_timed(lambda: collected.append(difference.people(
                conn.execute("select count(distinct unit), array_agg(distinct unit order by unit) from people").fetchone()[1]))) for _ in range(3))
            assert np.array_equal(collected[-1], units)
            # A history of 20 rows near this size: 19 that differ by thousands of people, one that differs by a single person.
            with conn.transaction():
                footprints.ensure(conn)
            for i in range(19):
                drop = int(rng.integers(1_000, 100_000))
                with conn.transaction():
                    footprints.record(conn, collab, "ad_hoc", f"old-{i}", [(0, units[drop:])], 365)
            with conn.transaction():
                footprints.record(conn, collab, "ad_hoc", "old-close", [(0, units[1:])], 365)
            verdicts: list[Any] = []

            def check() -> None:
                with conn.transaction():
                    footprints.lock(conn, collab)
                    verdicts.append(footprints.check(conn, collab, [units], 25, 365, source="ad_hoc", source_id="new"))

            check_s = min(_timed(check) for _ in range(3))
            assert not verdicts[-1][0].released  # one person away from "old-close": withheld
            far = units[50_000:]
            far_s = min(_timed(lambda: footprints.check(conn, collab, [far[:-30_000]], 25, 365, source="ad_hoc", source_id="far")) for _ in range(3))
            record_s = min(_timed(lambda: footprints.record(conn, collab, "ad_hoc", f"new-{time.perf_counter_ns()}", [(0, units)], 365)) for _ in range(3))
            row_bytes = conn.execute("select length(people) + length(sample) from dcr_meta.released_people limit 1").fetchone()[0]
    finally:
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
    out = {
        "people": int(units.size),
        "phase1_count_only_s": round(count_only, 3), "phase1_with_people_set_s": round(with_people, 3),
        "collecting_the_set_extra_s": round(with_people - count_only, 3),
        "check_against_20_rows_one_close_s": round(check_s, 3), "check_against_20_rows_none_close_s": round(far_s, 3),
        "record_one_row_s": round(record_s, 3), "bytes_per_row_kept": int(row_bytes),
    }
    print(f"at {units.size:,} people: collecting the set +{out['collecting_the_set_extra_s']} s over counting "
          f"({count_only:.2f} s), check {check_s:.2f} s (one close row) / {far_s:.2f} s (none close), record {record_s:.2f} s, "
          f"{row_bytes / 1e6:.1f} MB per row kept", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows per party for the demo-size comparison")
    parser.add_argument("--people", type=int, default=1_000_000, help="people in one group for the scale measurement")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from dcr_pipelines.lib.settings import PROJECT_ROOT

    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "demo_size": demo_size(args.rows, args.rounds),
        "at_scale": at_scale(args.people),
    }
    out = PROJECT_ROOT / "benchmarks" / "results" / "difference_checks.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
