"""What differential privacy costs an ad-hoc query: DP against exact at 10k and 1M matched people, and the noise it adds.

    .venv/bin/python benchmarks/ad_hoc.py [--people 10000,1000000] [--rounds 5] [--count-trials 300]

A fresh embedded PostgreSQL holds one collaboration, a copy of the demo with
``customers`` under its differential_privacy rule and ``customers_exact`` (the
same columns) under the exact aggregation rule. For each size its matched
views are replaced by tables of that many matched people (three impressions
each on average, one customer row each), generated in SQL; then the same
questions run through ``ad_hoc_service.execute`` (what the Dagster asset calls)
against ``customers`` (DP: per-person bounding, opendp noise, the ledger) and
``customers_exact`` (exact: per person, threshold, difference checks),
alternately, ``--rounds`` times each. Every run's text differs by a literal
(``and n = n``), so each DP run draws fresh noise and is charged.

Reported per size: the median time of each question each way and the ratio
DP / exact of their sums (target: at most 1.5). Then, at the smallest size,
the noise of a COUNT at epsilon 1: the 95th percentile of |noised - true|
over ``--count-trials`` runs against opendp's analytic 95% half-width for the
same scale (target: within 2x).

Writes ``benchmarks/results/ad_hoc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COLLAB = "bench_ad_hoc"
EXACT_COPY = """
  customers_exact:
    owner: retailer
    columns:
      customer_email: {type: text, identifier: email, nullable: false, unique: true, join: true}
      loyalty_tier: {type: text, nullable: false, dimension: true, allowed_values: [bronze, silver, gold]}
      age_band: {type: text, nullable: false, dimension: true}
      lifetime_value: {type: numeric, nullable: false, aggregate: [sum, avg], range: [0, 1000000]}
    analysis_rule: {type: aggregation, min_distinct_units: 25, join_required: true, scalar_functions: [round], join_operators: [and]}
"""
QUESTIONS = {
    "tier_people_and_average": "select c.loyalty_tier, count(distinct c.customer_email) as buyers, avg(c.lifetime_value) as value "
                               "from impressions as i inner join {t} as c on c.customer_email = i.user_email where {n} = {n} group by 1",
    "campaign_people_and_sum": "select i.campaign_id, count(distinct c.customer_email) as buyers, sum(c.lifetime_value) as value "
                               "from impressions as i inner join {t} as c on c.customer_email = i.user_email where {n} = {n} group by 1",
    "everyone": "select count(distinct c.customer_email) as buyers from impressions as i inner join {t} as c on c.customer_email = i.user_email "
                "where {n} = {n}",
}
COUNT = "select count(distinct c.customer_email) as buyers from impressions as i inner join customers as c on c.customer_email = i.user_email where {n} = {n}"


def staged_now(conn: Any, loaded: Any) -> Any:
    """What the staged data were built from, as Dagster's event log records it (the gate's input)."""
    import dagster as dg

    from dcr_pipelines.defs import freshness

    return freshness.staged(dg.DagsterInstance.get(), conn, loaded)



def _setup() -> tuple[Path, Any, Any]:
    home = Path(tempfile.mkdtemp(prefix="dcr-bench-ad_hoc-"))
    os.environ["DCR_HOME"] = str(home)
    os.environ.pop("DCR_DATABASE_URL", None)
    import psycopg

    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.lib.policy.approve import approve_all
    from dcr_pipelines.lib.runtime import activate
    from dcr_pipelines.lib.settings import PROJECT_ROOT
    from dcr_pipelines.store import access

    runtime = activate()
    folder = home / "policies" / COLLAB
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    shutil.rmtree(folder / "queries")
    path = folder / "collaboration.yaml"
    text = path.read_text().replace("name: demo", f"name: {COLLAB}").split("\napprovals:\n")[0] + "\nschedules: []\n"
    text = text.replace("\nbudgets:", EXACT_COPY + "\nbudgets:", 1).replace("    epsilon: 10.0", "    epsilon: 1000000.0")
    path.write_text(text + "difference_checks: {enabled: true}\n")
    approve_all(folder)
    loaded = load_collaboration(folder)
    with psycopg.connect(runtime.warehouse.url(), autocommit=True) as conn:
        access.apply(conn, loaded)
    return home, runtime, loaded


def _load_people(url: str, people: int) -> int:
    """Matched views of ``people`` matched people, as tables: ~3 impressions each, one customer row each (both copies)."""
    import psycopg

    from dcr_pipelines.lib import naming

    schema = naming.analysis_schema(COLLAB)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("matched_impressions", "matched_customers", "matched_customers_exact"):
            kind = conn.execute("select relkind from pg_class where oid = to_regclass(%s)", (f'"{schema}".{table}',)).fetchone()
            if kind:
                conn.execute(f'drop {"view" if kind[0] == "v" else "table"} "{schema}".{table}')
        conn.execute(f"""create table "{schema}".matched_customers as
            select md5(p::text) as match_id, hashtextextended(p::text, 7) as dcr_unit, p::bigint as dcr_row,
                   (array['bronze','bronze','bronze','silver','silver','gold'])[1 + p % 6] as loyalty_tier,
                   (array['18-24','25-34','35-44','45-54','55+'])[1 + p % 5] as age_band,
                   round((500 + 400 * sin(p))::numeric, 2) as lifetime_value
            from generate_series(1, {people}) as p""")
        conn.execute(f'create table "{schema}".matched_customers_exact as select * from "{schema}".matched_customers')
        conn.execute(f"""create table "{schema}".matched_impressions as
            select c.match_id, c.dcr_unit, row_number() over () as dcr_row,
                   (array['spring_sale','summer_launch','back_to_school','black_friday','holiday_gifts','new_year'])[1 + (p * 7 + k) % 6] as campaign_id,
                   timestamp '2026-01-01' + make_interval(secs => (p * 13 + k * 101) % 15552000) as impression_time
            from "{schema}".matched_customers c, lateral (select c.dcr_row as p) x, generate_series(1, 1 + (c.dcr_row % 5)::int) as k""")
        for table in ("matched_impressions", "matched_customers", "matched_customers_exact"):
            conn.execute(f'analyze "{schema}".{table}')
        conn.execute("delete from dcr_meta.released_people where collaboration = %s", (COLLAB,)) if conn.execute(
            "select to_regclass('dcr_meta.released_people')").fetchone()[0] else None
        return int(conn.execute(f'select count(*) from "{schema}".matched_impressions').fetchone()[0])


def _run(conn: Any, loaded: Any, text: str, tag: str) -> tuple[float, Any]:
    from dcr_pipelines.lib import ad_hoc
    from dcr_pipelines.services import ad_hoc as ad_hoc_service

    started = time.perf_counter()
    checked = ad_hoc.check(loaded, "ad_network", text)
    result = ad_hoc_service.execute(conn, loaded, checked, tag, text, staged_now(conn, loaded))
    return time.perf_counter() - started, result


def latency(url: str, loaded: Any, people: int, rounds: int, counter: list[int]) -> dict[str, Any]:
    import psycopg

    impressions = _load_people(url, people)
    times: dict[str, dict[str, list[float]]] = {q: {"dp": [], "exact": []} for q in QUESTIONS}
    with psycopg.connect(url, autocommit=True) as conn:
        for r in range(rounds):
            for name, template in QUESTIONS.items():
                order = [("dp", "customers"), ("exact", "customers_exact")]
                for mode, table in order if r % 2 == 0 else order[::-1]:
                    counter[0] += 1
                    if mode == "exact":  # exact runs are compared with everything released before: start each from none
                        conn.execute("delete from dcr_meta.released_people where collaboration = %s", (COLLAB,))
                    elapsed, result = _run(conn, loaded, template.format(t=table, n=counter[0]), f"bench-{counter[0]}")
                    assert result.mode == mode and not result.cached and result.failure is None, result
                    times[name][mode].append(elapsed)
    medians = {q: {m: round(statistics.median(v) * 1000, 1) for m, v in t.items()} for q, t in times.items()}
    dp_total, exact_total = sum(m["dp"] for m in medians.values()), sum(m["exact"] for m in medians.values())
    out = {"matched_people": people, "impression_rows": impressions, "median_ms": medians,
           "dp_ms_total": round(dp_total, 1), "exact_ms_total": round(exact_total, 1), "ratio_dp_to_exact": round(dp_total / exact_total, 3)}
    print(f"{people:>9,} matched people: DP {dp_total:.0f} ms vs exact {exact_total:.0f} ms for the {len(QUESTIONS)} questions, "
          f"ratio {out['ratio_dp_to_exact']} (target <= 1.5); " + "; ".join(f"{q} {m['dp']}/{m['exact']} ms" for q, m in medians.items()), flush=True)
    return out


def count_noise(url: str, loaded: Any, people: int, trials: int, counter: list[int]) -> dict[str, Any]:
    import psycopg

    from dcr_pipelines.lib import ad_hoc
    from dcr_pipelines.lib.privacy import ad_hoc as ad_hoc_noise

    _load_people(url, people)
    checked = ad_hoc.check(loaded, "ad_network", COUNT.format(n=0))
    assert checked.dp is not None
    plan = ad_hoc_noise.plan(checked.dp)
    (count_plan,) = plan.plans
    errors = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(trials):
            counter[0] += 1
            _, result = _run(conn, loaded, COUNT.format(n=counter[0]), f"bench-{counter[0]}")
            errors.append(abs(result.rows[0]["buyers"] - people))
    errors.sort()
    p95 = errors[int(0.95 * (len(errors) - 1))]
    out = {"epsilon": plan.epsilon, "scale": count_plan.scale, "trials": trials, "empirical_p95_abs_error": p95,
           "opendp_95_half_width": round(count_plan.accuracy, 3), "ratio": round(p95 / count_plan.accuracy, 3),
           "mean_abs_error": round(statistics.mean(errors), 3)}
    print(f"COUNT at epsilon {plan.epsilon:g}: 95% of |error| <= {p95} over {trials} runs, opendp's analytic 95% half-width "
          f"{count_plan.accuracy:.2f}, ratio {out['ratio']} (target <= 2)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", default="10000,1000000", help="matched people, comma separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count-trials", type=int, default=300)
    args = parser.parse_args()
    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.settings import PROJECT_ROOT

    sizes = [int(p) for p in args.people.split(",")]
    home, runtime, loaded = _setup()
    url = runtime.warehouse.url()
    counter = [0]
    try:
        result = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            "latency": [latency(url, loaded, people, args.rounds, counter) for people in sizes],
            "count_noise": count_noise(url, loaded, min(sizes), args.count_trials, counter),
        }
    finally:
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
    out = PROJECT_ROOT / "benchmarks" / "results" / "ad_hoc.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
