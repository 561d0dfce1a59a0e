"""Three parties, two identifiers (examples/three_parties): the operator's real `dcr run` on its own embedded
PostgreSQL, then both queries released and compared with pandas over the generated people.

- ``plan_segments`` (dp) reads the people the bank and the telecom share (by phone: the telecom has no emails), whatever
  the airline holds: its pre-noise aggregates equal pandas, its release has every group of the domain;
- ``flyer_segments`` reads the people all three share: the airline knows people by email, the telecom by phone,
  so only a bank record with both joins them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from dcr_pipelines.lib.policy.approve import approve_all

pytestmark = pytest.mark.slow
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three_parties"


def _make_data():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("three_parties_data", EXAMPLE / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _released(stdout: str, dims: list[str]) -> dict[tuple[str, ...], int]:
    rows = json.loads(stdout)["rows"]
    return {tuple(r[d] for d in dims): int(r["customers"]) for r in rows if r.get("customers") is not None}  # one row per group


def _expected(frame: pd.DataFrame, dims: list[str], floor: int) -> dict[tuple[str, ...], int]:
    counts = frame.groupby(dims).size()
    return {tuple(k): int(v) for k, v in counts.items() if v >= floor}


def test_pairwise_and_all_party_overlaps_equal_pandas(tmp_path: Path) -> None:
    data = _make_data()
    people = data.people(700, seed=5)
    home, landing, root = tmp_path / "home", tmp_path / "landing", tmp_path / "policies"
    shutil.copytree(EXAMPLE, root / "three_parties", ignore=shutil.ignore_patterns("*.py"))
    data.write(landing, people, seed=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_", "DBT_", "PG"))}
    env.update({"DCR_HOME": str(home), "DCR_LANDING": str(landing), "DCR_POLICIES": str(root), "DCR_SETTLE_SECONDS": "0"})

    def dcr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=900, env=env)

    try:
        ran = dcr("run", "three_parties")
        assert ran.returncode == 0, ran.stderr + ran.stdout
        bank_phone = people[people.bank_has.isin(["phone", "both"])]
        expected = _expected(bank_phone[bank_phone.telecom], ["plan", "segment"], 0)
        url = dcr("db", "url").stdout.strip()
        with psycopg.connect(url) as conn:  # the pre-noise aggregates of the dp query over the bank's and the telecom's people
            pre_noise = {(p, s): int(n) for p, s, n in conn.execute('select plan, segment, customers from "three_parties_analysis"."query_plan_segments"')}
        assert len(expected) == 4 and pre_noise == expected
        pairs = dcr("release", "three_parties", "plan_segments", "--format", "json")
        assert pairs.returncode == 0, pairs.stderr
        released = _released(pairs.stdout, ["plan", "segment"])
        assert released.keys() == expected.keys() and all(abs(released[k] - expected[k]) < 40 for k in expected)  # noised, epsilon 1
        all_three = people[(people.bank_has == "both") & people.telecom & people.airline]
        everyone = dcr("release", "three_parties", "flyer_segments", "--format", "json")
        assert everyone.returncode == 0, everyone.stderr
        expected = _expected(all_three, ["status", "segment"], 10)
        assert len(expected) >= 4 and _released(everyone.stdout, ["status", "segment"]) == expected
        # the exact overlap release is of the people all three share
        overlap = dcr("overlap", "three_parties", "--format", "json")
        assert overlap.returncode == 0, overlap.stderr
        assert json.loads(overlap.stdout)["rows"][0]["matched_people"] == len(all_three)
        # the airline's audit export: no overlap of the bank and the telecom, no per-kind links, no other party's records
        audit = dcr("audit", "three_parties", "--member", "airline", "--format", "jsonl")
        assert audit.returncode == 0, audit.stderr
        assert '"matched_all"' in audit.stdout  # the exact all-party overlap, as the policy releases it
        for hidden in ("matched__bank__telecom", "linked_", "input_records_bank", "input_records_telecom", "bytes_exchanged"):
            assert hidden not in audit.stdout, hidden
        # nothing changed: a second run matches nothing again and keeps the match_ids
        again = dcr("run", "three_parties")
        assert again.returncode == 0, again.stderr
        repeat = dcr("release", "three_parties", "flyer_segments", "--format", "json")
        assert _released(repeat.stdout, ["status", "segment"]) == _released(everyone.stdout, ["status", "segment"])
        # The query no longer reads some of the parties: its views of the bank-telecom overlap, left by the earlier
        # policy, are dropped (not refused as the builder's tampering), and the run goes through.
        spec = root / "three_parties" / "queries" / "plan_segments.yaml"
        spec.write_text(spec.read_text().replace("parties: [bank, telecom]", ""))
        approve_all(root / "three_parties")
        moved = dcr("run", "three_parties")
        assert moved.returncode == 0, moved.stderr + moved.stdout
        with psycopg.connect(url) as conn:
            views = {r[0] for r in conn.execute("select viewname from pg_views where schemaname = 'three_parties_analysis'")}
        assert "matched_accounts" in views and not {v for v in views if v.endswith("__bank__telecom")}, views
    finally:
        dcr("db", "stop")
