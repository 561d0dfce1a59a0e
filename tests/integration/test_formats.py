"""`--format table|json|csv` means the same in every listing command: json's ``rows`` and the csv's lines are the same
result rows, under the same columns, value for value; what a row cannot say goes to json's fields and csv's stderr."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest

DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
# Exact (the ad network's own table, aggregation rule): no budget spent, so the session's e2e ledger stays as other tests expect.
EXACT_SQL = "select i.campaign_id, count(distinct i.user_email) as users from impressions as i group by i.campaign_id"
LISTINGS = {
    "release (dp)": ["release", "e2e", "campaign_reach"],
    "query run (exact)": ["query", "run", "e2e", "--member", "ad_network", EXACT_SQL],
    "budget": ["budget", "e2e"],
    "overlap": ["overlap", "e2e"],
    "audit": ["audit", "e2e", "--member", "retailer"],
    "uploads list": ["uploads", "list", "e2e"],
    "db roles": ["db", "roles", "e2e"],
    "member list": ["member", "list", "e2e"],
    "policy hash": ["policy", "hash", "e2e"],
    "policy check": ["policy", "check", "{root}"],
}


def _dcr(e2e: dict[str, Any], args: list[str], fmt: str) -> subprocess.CompletedProcess[str]:
    args = [a.replace("{root}", str(e2e["root"])) for a in args]
    proc = subprocess.run([*DCR, *args, "--format", fmt], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DCR_POLICIES": str(e2e["root"])})
    assert proc.returncode == 0, proc.stderr
    return proc


def _as_csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


@pytest.mark.parametrize("name", list(LISTINGS))
def test_json_rows_and_csv_lines_are_the_same_result_rows(e2e: dict[str, Any], name: str) -> None:
    args = LISTINGS[name]
    first = _dcr(e2e, args, "json")  # a release asked twice is answered from the store: the same rows, free
    as_json = json.loads(first.stdout)
    as_csv = list(csv.reader(io.StringIO(_dcr(e2e, args, "csv").stdout)))
    assert as_json["rows"], f"{name}: the listing is empty, so the comparison would prove nothing"
    assert as_csv[0] == as_json["columns"]
    assert len(as_csv) - 1 == len(as_json["rows"])
    for line, row in zip(as_csv[1:], as_json["rows"], strict=True):
        assert line == [_as_csv(row[c]) for c in as_json["columns"]], name
    table = _dcr(e2e, args, "table").stdout
    assert table.strip() and not table.lstrip().startswith("{"), "table is for people"


def test_a_release_is_one_row_per_group_with_each_metric_and_its_interval(e2e: dict[str, Any]) -> None:
    released = json.loads(_dcr(e2e, LISTINGS["release (dp)"], "json").stdout)
    assert released["columns"] == ["campaign_id", "store_region", "buyers", "buyers_ci_low", "buyers_ci_high", "spend", "spend_ci_low", "spend_ci_high"]
    groups = {(r["campaign_id"], r["store_region"]) for r in released["rows"]}
    assert len(groups) == len(released["rows"])  # one row per group, not one per metric
    assert all(r["buyers_ci_low"] <= r["buyers"] <= r["buyers_ci_high"] for r in released["rows"])
    assert released["release_id"] and "withheld_rows" not in released  # DP releases withhold no rows; key selection is noise
    csv_run = _dcr(e2e, LISTINGS["release (dp)"], "csv")
    assert "note: identical release found" in csv_run.stderr  # what a row cannot say goes to stderr, not into the CSV


def test_every_listing_command_offers_the_same_three_formats() -> None:
    import click

    from dcr_pipelines.cli import main

    def walk(cmd: click.Command, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
        if isinstance(cmd, click.Group):
            return {k: v for name, sub in cmd.commands.items() for k, v in walk(sub, (*path, name)).items()}
        return {" ".join(path): cmd}

    commands = walk(main)
    formats = {name: next((p for p in cmd.params if p.name == "fmt"), None) for name, cmd in commands.items()}
    listing = {" ".join(a for a in args if not a.startswith("-") and a not in ("e2e", "campaign_reach", EXACT_SQL, "{root}", "retailer", "ad_network"))
               for args in LISTINGS.values()}
    assert listing == {"release", "query run", "budget", "overlap", "audit", "uploads list", "db roles", "member list", "policy hash", "policy check"}
    for name in listing:
        option = formats[name]
        assert option is not None, f"{name} has no --format"
        assert isinstance(option.type, click.Choice) and list(option.type.choices) == ["table", "json", "csv"], name
    assert {name for name, option in formats.items() if option is not None} == listing  # and no other command has one of its own


def test_what_a_csv_cannot_carry_is_named_on_stderr(e2e: dict[str, Any]) -> None:
    """The second table of the table form is named in a `note:`, not dropped in silence."""
    assert "note: who spends on each owner's data is the json's owners field" in _dcr(e2e, LISTINGS["budget"], "csv").stderr
    assert "is the json's current field" in _dcr(e2e, LISTINGS["uploads list"], "csv").stderr
    assert "rows with fewer than 25 distinct people were removed" in _dcr(e2e, LISTINGS["query run (exact)"], "csv").stderr
    assert json.loads(_dcr(e2e, LISTINGS["budget"], "JSON").stdout)["rows"]  # the format's name in any case
