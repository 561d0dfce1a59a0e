"""Many requests at once, through the command line: every answer is for its own request, nothing crashes, the ledger holds.

The ``concur`` collaboration is the demo with a budget of 2.5. At the same
time: two `dcr run`, then eight `dcr release` of the threshold query
(exact, so each answer can be checked against the plain files for its own
parameter) and of a DP query (four, identical ones among them,
more than the budget pays for), and two ad-hoc queries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.settings import PROJECT_ROOT

from ..policy_edits import exact_customers, threshold_tier_reach
from .conftest import land

COLLAB = "concur"
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"

pytestmark = pytest.mark.slow


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*DCR, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def _clean(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code != 0:
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("concur_policies")
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", root / COLLAB)
    path = root / COLLAB / "collaboration.yaml"
    # customers exact: the two ad-hoc runs spend no budget, so the budget (2.5) is the releases' alone
    path.write_text(exact_customers(path.read_text()).replace("name: demo", f"name: {COLLAB}").replace("epsilon: 10.0", "epsilon: 2.5"))
    threshold_tier_reach(root / COLLAB)
    approve_all(root / COLLAB)
    files = demo_data.generate(runtime.settings.home / "generated" / COLLAB, rows=1500, overlap=0.4, seed=17)
    land(files, runtime.settings.landing, COLLAB)
    env = {**os.environ, "DCR_POLICIES": str(root)}
    return {"env": env, "files": files, "url": runtime.warehouse.url()}


def expected_tier_reach(files: demo_data.DemoFiles, since: str) -> dict[tuple[str, str, str], float]:
    i = pd.read_csv(files.impressions).assign(email=lambda f: f["user_email"].str.strip().str.lower())
    c = pd.read_csv(files.customers).assign(email=lambda f: f["customer_email"].str.strip().str.lower())  # type: ignore[arg-type]
    exposed = i[i["impression_time"] >= since][["email", "campaign_id"]].drop_duplicates().merge(c, on="email")
    exposed["clamped"] = exposed["lifetime_value"].clip(0, 5000)
    groups = exposed.groupby(["campaign_id", "loyalty_tier"]).agg(buyers=("email", "nunique"), lifetime_value=("clamped", "mean")).reset_index()
    groups = groups[groups["buyers"] >= 25]
    out = {}
    for _, g in groups.iterrows():
        out[(g["campaign_id"], g["loyalty_tier"], "buyers")] = float(g["buyers"])
        out[(g["campaign_id"], g["loyalty_tier"], "lifetime_value")] = float(g["lifetime_value"])
    return out


def test_two_runs_at_once_both_finish_and_release_nothing(ctx: dict[str, Any]) -> None:
    procs = [_start(ctx["env"], "run", COLLAB) for _ in range(2)]
    for proc in procs:
        code, out, err = _finish(proc)
        _clean(code, err)
        assert code == 0, err
        assert "nothing was released and no budget was spent" in out
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        table = f"{naming.results_schema(COLLAB)}.budget_ledger"
        charged = conn.execute(f"select count(*) from {table} where consumer = 'ad_network'").fetchone()[0] \
            if conn.execute("select to_regclass(%s)", (table,)).fetchone()[0] else 0
    assert charged == 0


def test_concurrent_releases_each_answer_their_own_request(ctx: dict[str, Any]) -> None:
    # Eight processes at once: twin threshold requests (one release), three distinct DP requests (the budget pays for two), two ad-hoc runs.
    tiers = ["2026-01-01", "2026-02-01", "2026-02-01"]
    reach = ["2026-01-01", "2026-02-01", "2026-03-01"]
    ad_hoc = f"select c.loyalty_tier, count(distinct c.customer_email) as buyers {JOIN} group by 1"
    procs = [("tier_reach", s, _start(ctx["env"], "release", COLLAB, "tier_reach", "--param", f"since={s}", "--format", "json")) for s in tiers]
    procs += [("campaign_reach", s, _start(ctx["env"], "release", COLLAB, "campaign_reach", "--param", f"since={s}", "--format", "json")) for s in reach]
    procs += [("ad_hoc", "", _start(ctx["env"], "query", "run", COLLAB, "--member", "ad_network", "--format", "json", ad_hoc)) for _ in range(2)]
    answers: dict[str, list[tuple[str, dict[str, Any] | None, str]]] = {"tier_reach": [], "campaign_reach": [], "ad_hoc": []}
    for name, since, proc in procs:
        code, out, err = _finish(proc)
        _clean(code, err)
        answers[name].append((since, json.loads(out) if code == 0 else None, err))
    # The threshold query: exact, so each answer must be its own parameter's (groups may be withheld, never wrong).
    for since, got, err in answers["tier_reach"]:
        assert got is not None, err
        assert got["params"] == {"since": since}
        expected = expected_tier_reach(ctx["files"], since)
        metrics = [c for c in got["columns"] if c not in ("campaign_id", "loyalty_tier")]  # one row per group, a column per metric
        released = {(r["campaign_id"], r["loyalty_tier"], m): r[m] for r in got["rows"] for m in metrics if r[m] is not None}
        assert all(key in expected and abs(value - expected[key]) < 1e-6 for key, value in released.items()), since
    assert any(got and got["rows"] for _, got, _ in answers["tier_reach"])
    twins = [got["release_id"] for since, got, _ in answers["tier_reach"] if since == "2026-02-01" and got]
    assert len(set(twins)) == 1  # identical requests: one release
    # The DP query: every answer is labelled with its own request, identical requests share one charge,
    # and the budget (2.5, at 1 each) pays for two distinct releases, never three.
    paid = [(since, got) for since, got, _ in answers["campaign_reach"] if got is not None]
    refused = [err for _, got, err in answers["campaign_reach"] if got is None]
    assert all(got["params"] == {"since": since} for since, got in paid)
    assert all("privacy budget of ad_network" in err for err in refused)
    distinct = {since: got["release_id"] for since, got in paid}
    assert len(distinct) == 2 and len({got["release_id"] for _, got in paid}) == 2
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        schema = naming.results_schema(COLLAB)
        spent = conn.execute(f"select coalesce(sum(epsilon), 0) from {schema}.budget_ledger where consumer = 'ad_network'").fetchone()[0]
        stored = dict(conn.execute(f"select release_id, params->>'since' from {schema}.releases where query_name = 'campaign_reach'").fetchall())
    assert spent <= 2.5 + 1e-9 and spent == pytest.approx(2.0)
    assert all(stored[rid] == since for since, rid in distinct.items())
    # The two ad-hoc runs at once: both answered, the same rows.
    runs = [got for _, got, _ in answers["ad_hoc"]]
    assert all(r is not None for r in runs) and runs[0]["rows"] == runs[1]["rows"]  # type: ignore[index]


def test_concurrent_ad_hoc_runs_all_land_in_the_one_run_storage_and_the_audit_matches_the_chain(ctx: dict[str, Any]) -> None:
    """Twenty `dcr query run` at once (each starts a deployment: writes of dagster.yaml raced and sent one run to a
    stray SQLite storage): every run is answered, every chained run is in the one run storage, and `dcr audit --verify`
    passes. The instance configuration is not rewritten by any of them."""
    from dcr_pipelines.defs import audit as trail
    from dcr_pipelines.store import audit_chain

    config = Path(ctx["env"]["DCR_HOME"]) / "dagster_home" / "dagster.yaml" if "DCR_HOME" in ctx["env"] else None
    stamp = config.stat().st_mtime_ns if config is not None and config.is_file() else None
    queries = [f"select i.campaign_id, count(*) as n from impressions as i where i.impression_time >= '2026-0{1 + k % 6}-{1 + k:02d}' group by 1"
               for k in range(20)]
    procs = [_start(ctx["env"], "query", "run", COLLAB, "--member", "ad_network", "--format", "json", q) for q in queries]
    run_ids = []
    for proc in procs:
        code, out, err = _finish(proc)
        _clean(code, err)
        assert code == 0, err
        run_ids.append(json.loads(out)["run_id"])
    instance = dg.DagsterInstance.get()
    assert trail.stored_runs(instance, run_ids) == set(run_ids)
    with psycopg.connect(ctx["url"]) as conn:
        chained = {row.entry["run_id"] for row in audit_chain.chain(conn, naming.results_schema(COLLAB)) if row.kind == "ad_hoc"}
    assert set(run_ids) <= chained
    verified = subprocess.run([*DCR, "audit", COLLAB, "--verify"], env=ctx["env"], capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr
    if stamp is not None:
        assert config is not None and config.stat().st_mtime_ns == stamp, "the instance configuration was rewritten"


def test_releases_killed_at_random_instants_leave_the_ledger_and_the_audit_chain_consistent(ctx: dict[str, Any]) -> None:
    """24 releases, six at a time, killed (SIGKILL) at random instants; a watcher also kills a release right after its
    commit appears, the moment between the ledger and Dagster's event. Afterwards `dcr audit --verify` recovers
    the missing events and passes, and every charge belongs to a stored release."""
    rng = random.Random(2026)
    requests = [("tier_reach", f"2026-{m:02d}-{d:02d}") for m in range(1, 7) for d in (3, 15, 27)] + [("region_spend", f"2026-0{m}-05") for m in range(1, 7)]
    rng.shuffle(requests)
    schema = naming.results_schema(COLLAB)
    killed = 0
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        for batch in (requests[i:i + 6] for i in range(0, len(requests), 6)):
            running = {(q, s): (_start(ctx["env"], "release", COLLAB, q, "--param", f"since={s}"), rng.uniform(0.5, 12.0)) for q, s in batch}
            started = time.monotonic()
            while any(p.poll() is None for p, _ in running.values()):
                committed = {(r[0], r[1]) for r in conn.execute(f"select query_name, params->>'since' from {schema}.releases").fetchall()}
                for request, (proc, deadline) in running.items():
                    if proc.poll() is not None:
                        continue
                    if time.monotonic() - started >= deadline or (request in committed and rng.random() < 0.7):
                        proc.kill()
                        killed += 1
                time.sleep(0.05)
            for proc, _ in running.values():
                proc.communicate()
    assert killed >= 20
    for attempt in range(2):  # the first run recovers events of killed releases; the second finds nothing left to do
        proc = subprocess.run([*DCR, "audit", COLLAB, "--verify"], env=ctx["env"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "intact" in proc.stdout and ("note:" not in proc.stderr if attempt else True)
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        orphans = conn.execute(f"select count(*) from {schema}.budget_ledger l where not exists "
                               f"(select 1 from {schema}.releases r where r.release_id = l.release_id) and l.release_id not like 'failed:%%'").fetchone()[0]
        charges = conn.execute(f"select count(*) from {schema}.budget_ledger where release_id not like 'failed:%%'").fetchone()[0]
        releases = conn.execute(f"select count(*) from {schema}.releases").fetchone()[0]
        spent = conn.execute(f"select coalesce(sum(epsilon), 0) from {schema}.budget_ledger where consumer = 'ad_network'").fetchone()[0]
    assert orphans == 0 and charges == releases and spent <= 2.5 + 1e-9
    # Every committed release has its export files for every receiver, a killed one's written by the next command.
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        committed = conn.execute(f"select release_id, query_name from {schema}.releases where query_name in ('tier_reach', 'region_spend')").fetchall()
    exports = Path(ctx["env"]["DCR_HOME"]) / "exports" / COLLAB
    missing = [(rid, q, r) for rid, q in committed for r in ("ad_network", "retailer")
               if not all((exports / r / q / f"{rid}.{suffix}").is_file() for suffix in ("csv", "parquet", "anchor.json"))]
    assert committed and not missing, missing


@pytest.mark.parametrize("kept", ["csv", "csv+parquet"])
def test_a_release_killed_between_its_export_files_gets_the_missing_ones(ctx: dict[str, Any], kept: str) -> None:
    """The moment between two export files: the next command writes what is missing, not only a missing CSV."""
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.services.release import export_committed_by
    from dcr_pipelines.store import audit_chain

    loaded = load_collaboration(Path(ctx["env"]["DCR_POLICIES"]) / COLLAB)
    exports = Path(ctx["env"]["DCR_HOME"]) / "exports"
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        entry = next(r for r in reversed(audit_chain.chain(conn, naming.results_schema(COLLAB))) if r.kind == "release" and r.entry.get("query_name") in loaded.queries)
        query = loaded.queries[str(entry.entry["query_name"])]
        folder = exports / COLLAB / query.spec.receivers[0] / query.name
        gone = [folder / f"{entry.ref}.{s}" for s in ("parquet", "anchor.json")[kept.count("+"):]]
        for path in gone:
            path.unlink()
        assert export_committed_by(conn, loaded, str(entry.entry["run_id"]), exports) == [entry.ref]
        assert all(path.is_file() for path in gone)
        assert export_committed_by(conn, loaded, str(entry.entry["run_id"]), exports) == [], "nothing left to write"
        # The policy's receivers changed since: the missing files go to those the release was made for, and only to them.
        recorded = [str(r) for r in entry.entry["receivers"]]
        assert recorded == list(query.spec.receivers)
        others = {"retailer", "ad_network"} - {recorded[0]}
        spec = query.spec.model_copy(update={"receivers": sorted(others)})
        moved = dataclasses.replace(loaded, queries={**loaded.queries, query.name: dataclasses.replace(query, spec=spec)})
        for path in gone:
            path.unlink()
        assert export_committed_by(conn, moved, str(entry.entry["run_id"]), exports) == [entry.ref]
        assert all(path.is_file() for path in gone)
        newcomers = [p for p in others - set(recorded) for p in (exports / COLLAB / p / query.name / f"{entry.ref}.csv",) if p.exists()]
        assert newcomers == [], "a receiver added later gets no earlier release"
