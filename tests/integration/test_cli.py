"""The command-line contract: --help everywhere, exit codes, one-line errors that name the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.settings import PROJECT_ROOT

DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
COMMANDS = [
    [], ["demo"], ["policy"], ["policy", "check"], ["policy", "hash"], ["ingest"], ["run"], ["release"],
    ["query"], ["query", "check"], ["query", "run"], ["budget"], ["audit"], ["db"], ["db", "url"], ["ui"],
    ["psi"], ["psi", "keygen"], ["psi", "prepare"], ["psi", "respond"], ["policy", "new"], ["db", "drop"], ["db", "roles"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "dcr" for c in COMMANDS])
def test_every_command_has_help(command: list[str]) -> None:
    proc = subprocess.run([*DCR, *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=300)


def test_a_bad_parameter_is_refused_before_anything_runs(runtime) -> None:  # type: ignore[no-untyped-def]
    proc = run("release", "demo", "campaign_reach", "--param", "since=2026-01-01'; drop table x; --")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: parameter since:") and "is not a valid date" in proc.stderr


def test_unknown_names_are_refused_with_the_alternatives(runtime) -> None:  # type: ignore[no-untyped-def]
    proc = run("release", "demo", "no_such_query")
    assert proc.returncode == 2 and "queries: campaign_reach" in proc.stderr
    proc = run("ingest", "demo", "ad_network", "purchases", "/dev/null")
    assert proc.returncode == 2 and "belongs to retailer" in proc.stderr
    proc = run("budget", "nope")
    assert proc.returncode == 2 and "no collaboration 'nope'" in proc.stderr


def test_dry_run_shows_the_epsilon_the_release_would_cost(runtime) -> None:  # type: ignore[no-untyped-def]
    proc = run("release", "demo", "campaign_reach", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "release would cost epsilon 1 of ad_network's budget" in proc.stdout
    assert "buyers: sensitivity 3" in proc.stdout and "spend__sum: sensitivity 900" in proc.stdout


def test_query_check_prints_ok_and_the_rules_or_one_refusal_line() -> None:
    sql_text = ("select c.loyalty_tier, count(distinct c.customer_email) as buyers from impressions as i "
                "inner join customers as c on c.customer_email = i.user_email group by 1")
    proc = run("query", "check", "demo", "--member", "ad_network", sql_text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok\n") and "customers (retailer, differential_privacy rule)" in proc.stdout
    assert "mode: differential privacy; costs epsilon 1 of ad_network's budget" in proc.stdout
    assert "groups: every combination of the keys' public domains (3)" in proc.stdout
    proc = run("query", "check", "demo", "--member", "ad_network", "select loyalty_tier, count(*) from customers group by 1")
    assert proc.returncode == 1
    assert proc.stderr == ("error: table customers requires an inner join with a table of the query runner (ad_network) "
                           "(differential_privacy rule, join_required)\n")
    proc = run("query", "check", "nope", "--member", "ad_network", "select 1")
    assert proc.returncode == 2 and "no collaboration 'nope'" in proc.stderr


def test_query_run_refuses_through_dagster_with_the_rule(runtime) -> None:  # type: ignore[no-untyped-def]
    proc = run("query", "run", "demo", "--member", "ad_network", "select * from impressions")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: query refused: SELECT * is not allowed: name the dimensions and aggregates to output (select *)"


def test_a_query_over_a_dp_dataset_is_released_with_noise_and_its_dry_run_shows_the_cost(runtime) -> None:  # type: ignore[no-untyped-def]
    """tier_reach reads customers, under the differential_privacy rule: a threshold query over it is refused by the policy
    check, so the demo releases it with noise."""
    proc = run("release", "demo", "tier_reach", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "release would cost epsilon 1 of ad_network's budget" in proc.stdout and "lifetime_value: an average" in proc.stdout


def test_budget_reports_remaining_and_how_many_releases_fit(runtime) -> None:  # type: ignore[no-untyped-def]
    import json

    proc = run("budget", "demo", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    consumer = report["rows"][0]
    assert consumer["consumer"] == "ad_network" and consumer["epsilon"] == 10.0
    # epsilon 1, 0.5 and 1 per release
    remaining = consumer["remaining"]
    assert consumer["releases_that_fit"] == {"campaign_reach": int(remaining // 1.0), "region_spend": int(remaining // 0.5), "tier_reach": int(remaining // 1.0)}


def test_a_refused_upload_prints_one_error_line_and_keeps_the_original(runtime, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.csv"
    bad.write_text("customer_email,purchase_value,purchase_date,store_region\nzoe@example.com,12.5,2026-03-01,middle\n")
    proc = run("ingest", "demo", "retailer", "purchases", str(bad))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: upload #") and " quarantined: bad.csv: " in lines[0], proc.stderr
    assert lines[0].endswith("the current data is unchanged")
    assert "expect_column_values_to_be_in_set on store_region: 1 row(s) broke it (rows 1)" in lines[0]
    assert "zoe@example.com" not in proc.stderr and bad.is_file()


USAGE_MISTAKES = [
    (["audit", "demo", "--since", "yesterday"], "audit", "invalid value for '--since': 'yesterday'"),
    (["query", "run", "demo", "select 1"], "query run", "missing option '--member'"),
    (["release", "demo", "campaign_reach", "--no-such-flag"], "release", "no such option '--no-such-flag'"),
    (["budget"], "budget", "missing argument 'COLLAB'"),
    (["db", "roles", "demo", "--format", "xml"], "db roles", "invalid value for '--format': 'xml' is not one of 'table', 'json', 'csv'"),
    (["no-such-command"], "", "no such command 'no-such-command'"),
]


@pytest.mark.parametrize(("args", "command", "cause"), USAGE_MISTAKES, ids=[" ".join(a) for a, _, _ in USAGE_MISTAKES])
def test_a_usage_mistake_is_one_error_line_with_exit_code_2(args: list[str], command: str, cause: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Usage:" not in proc.stderr
    see = f"(see `dcr {command} --help`)" if command else "(see `dcr --help`)"
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {cause}") and proc.stderr.rstrip().endswith(see), proc.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_unknown_member_is_a_usage_mistake_naming_the_members(runtime, command: str) -> None:  # type: ignore[no-untyped-def]
    proc = run("query", command, "demo", "--member", "nobody", "select campaign_id, count(*) from impressions group by 1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: demo has no member 'nobody' (members: retailer, ad_network); give one of them with --member\n"


def _home_copy(root: Path, name: str, overlap_release: str) -> None:
    """demo_home under a name of its own (so no earlier test released its overlap), with overlap_release set."""
    folder = root / name
    shutil.copytree(PROJECT_ROOT / "policies" / "demo_home", folder)
    collab = folder / "collaboration.yaml"
    text = collab.read_text().replace("name: demo_home", f"name: {name}", 1)
    assert "  overlap_release: dp " in text
    collab.write_text(text.replace("  overlap_release: dp ", f"  overlap_release: {overlap_release} ", 1))
    approve_all(folder)


def test_overlap_format_json_prints_json_in_every_case(e2e: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "policies"
    _home_copy(root, "ovl_withheld", "withheld")
    _home_copy(root, "ovl_none", "dp")

    def overlap(collab: str, policies: Path) -> dict[str, Any]:
        proc = subprocess.run([*DCR, "overlap", collab, "--format", "json"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DCR_POLICIES": str(policies)})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)  # nothing but the JSON document on stdout

    withheld = overlap("ovl_withheld", root)
    assert {k: withheld[k] for k in ("collaboration", "overlap_release", "status", "rows")} == {
        "collaboration": "ovl_withheld", "overlap_release": "withheld", "status": "withheld by policy", "rows": []}
    none = overlap("ovl_none", root)
    assert {k: none[k] for k in ("collaboration", "overlap_release", "status", "rows")} == {
        "collaboration": "ovl_none", "overlap_release": "dp", "status": "none released yet", "rows": []}
    released = overlap("e2e", e2e["root"])  # the session's run of e2e matched its parties: the exact count is released
    assert released["overlap_release"] == "exact" and released["status"] == "released"
    assert released["rows"] and all(r["matched_people"] > 0 and r["ci_low"] is None for r in released["rows"])


def test_db_roles_prints_a_legend_of_its_cells(e2e: dict[str, Any]) -> None:
    import re

    proc = subprocess.run([*DCR, "db", "roles", "e2e"], capture_output=True, text=True, timeout=300, env={**os.environ, "DCR_POLICIES": str(e2e["root"])})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\bread \d+/\d+\b", proc.stdout), proc.stdout  # a partial cell is there (a reader of some releases only) ...
    legend = proc.stdout.strip().splitlines()[-1]
    assert legend.startswith("cells: ")  # ... and the line below the table says what each kind of cell means
    for term in ("write = ", "read = ", "read N/M = may select N of the schema's M tables", "usage = ", "- = nothing"):
        assert term in legend, legend


def test_dry_run_reads_the_remaining_budget_and_refuses_what_does_not_fit(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from .conftest import make_collaboration

    root = tmp_path / "policies"
    make_collaboration(root, "dry_small", groups=3, budget=0.5)  # campaign_reach costs epsilon 1
    avg = make_collaboration(root, "dry_avg", groups=3, budget=4.0)
    spec = avg / "queries" / "campaign_reach.yaml"
    old = "spend: {aggregate: sum, column: spend, bounds: [0, 300], epsilon_share: 2}"
    assert old in spec.read_text()
    spec.write_text(spec.read_text().replace(old, "spend: {aggregate: avg, column: spend, bounds: [0, 300], epsilon_share: 2}"))
    approve_all(avg)
    env = {**os.environ, "DCR_POLICIES": str(root)}

    refused = subprocess.run([*DCR, "release", "dry_small", "campaign_reach", "--dry-run"], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 1, refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and refused.stderr.startswith(
        "error: the release of campaign_reach would cost epsilon 1, and ad_network has 0.5 of 0.5 left (rolling 30-day window)"), refused.stderr
    assert "nothing was run or charged" in refused.stderr and "left now" not in refused.stdout

    fits = subprocess.run([*DCR, "release", "dry_avg", "campaign_reach", "--dry-run"], capture_output=True, text=True, timeout=300, env=env)
    assert fits.returncode == 0, fits.stderr
    assert "release would cost epsilon 1 of ad_network's budget: 4 of 4 left now, 3 after it (rolling 30-day window)" in fits.stdout
    # The average's share (2/3 of epsilon 1) is split evenly between its noisy sum and its noisy count.
    assert "spend: an average, released as noisy sum / noisy count: epsilon 0.3333 (sum) + 0.3333 (count) = 0.6667" in fits.stdout, fits.stdout
    assert "spend__sum: sensitivity 900" in fits.stdout and "spend__count: sensitivity 3" in fits.stdout



def test_audit_anchor_without_verify_is_refused(tmp_path: Path) -> None:
    anchor = tmp_path / "head.anchor.json"
    anchor.write_text('{"collaboration": "demo", "seq": 1, "chain_sha256": "00"}')
    proc = run("audit", "demo", "--anchor", str(anchor))
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == "error: --anchor is a chain head to check: it takes --verify (dcr audit COLLAB --verify --anchor FILE)\n"


def test_the_demo_prints_the_releases_it_asked_for_not_a_later_request(runtime) -> None:  # type: ignore[no-untyped-def]
    assert run("demo", "--rows", "1000").returncode == 0
    other = run("release", "demo", "tier_reach", "--param", "since=2026-01-05")
    assert other.returncode == 0 and '"since": "2026-01-05"' in other.stdout
    again = run("demo", "--rows", "1000")
    assert again.returncode == 0, again.stderr
    shown = again.stdout.split("demo/tier_reach, release", 1)[1].splitlines()[0]
    assert '"since": "2026-01-01"' in shown and "2026-01-05" not in shown
    assert "Blocking asset check" not in again.stdout + again.stderr  # an unchanged stage's checks carry their verdicts


def test_a_bad_chart_path_or_database_url_is_one_line_before_anything_runs(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for chart, said in ((tmp_path / "reach.txt", "ending in .png"), (tmp_path / "missing" / "reach.png", "does not exist")):
        proc = run("release", "demo", "campaign_reach", "--chart", str(chart))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr
    assert not (tmp_path / "missing").exists()
    bad = subprocess.run([*DCR, "budget", "demo"], capture_output=True, text=True, timeout=300, env={**os.environ, "DCR_DATABASE_URL": "not-a-url"})
    assert bad.returncode == 2 and bad.stderr.startswith("error: not a PostgreSQL URL") and bad.stderr.count("\n") == 1
