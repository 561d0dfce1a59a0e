"""A bank and a telecom match on phone numbers written as each exports them (the case an outside user tried: US
numbers with the trunk prefix 1, 00 and 011 international prefixes, dots, dashes, parentheses, none): the pipeline
matches every planted shared person (the pandas reference over the library's E.164), and counts what it refused by
reason; nothing is left unmapped. Its own deployment (embedded PostgreSQL), the operator's real `dcr run`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import phonenumbers
import pytest

from dcr_pipelines.lib.policy.approve import approve_all

pytestmark = pytest.mark.slow
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
POLICY = Path(__file__).with_name("phones_collaboration.yaml")
AREAS = ("201", "212", "305", "415", "617", "702", "728", "808", "917")


def _written(e164: str, rng: random.Random) -> str:
    number = phonenumbers.parse(e164)
    national = str(number.national_number)
    area, exchange, line = national[:3], national[3:6], national[6:]
    return rng.choice([
        f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"{area}.{exchange}.{line}", f"1-{area}-{exchange}-{line}",
        f"+1 {area} {exchange} {line}", f"001 {area} {exchange} {line}", f"011 1 {area} {exchange} {line}", e164,
        f"1 ({area}) {exchange}-{line}", f" {area}{exchange}{line} ",
    ])


def _e164(text: str) -> str | None:
    try:
        n = phonenumbers.parse(text.strip() if not text.strip().startswith("00") else "+" + text.strip()[2:], "US")
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164) if phonenumbers.is_possible_number(n) else None


def test_numbers_written_every_way_match_as_the_numbering_plan_says(tmp_path: Path) -> None:
    rng = random.Random(32)
    people = sorted({f"+1{rng.choice(AREAS)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}" for _ in range(1400)})
    shared, bank_only, telecom_only = people[:600], people[600:1000], people[1000:]
    bad = ["call me", "12345", "+999 1234 5678"]  # refused: invalid_characters, invalid_length, invalid_country_code
    accounts = [(_written(p, rng), rng.choice(["retail", "private"])) for p in shared + bank_only] + [(b, "retail") for b in bad]
    subscribers = [(_written(p, rng), rng.choice(["prepaid", "contract"])) for p in shared + telecom_only]
    home, landing, root = tmp_path / "home", tmp_path / "landing", tmp_path / "policies"
    (root / "phones").mkdir(parents=True)
    shutil.copy(POLICY, root / "phones" / "collaboration.yaml")
    approve_all(root / "phones")
    for party, dataset, columns, rows in (("bank", "accounts", ["phone", "segment"], accounts),
                                          ("telecom", "subscribers", ["msisdn", "plan"], subscribers)):
        folder = landing / "phones" / party / dataset
        folder.mkdir(parents=True)
        pd.DataFrame(rows, columns=columns).sample(frac=1, random_state=1).to_csv(folder / f"{dataset}.csv", index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_", "DBT_", "PG"))}
    env.update({"DCR_HOME": str(home), "DCR_LANDING": str(landing), "DCR_POLICIES": str(root), "DCR_SETTLE_SECONDS": "0"})

    def dcr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=900, env=env)

    try:
        ran = dcr("run", "phones")
        assert ran.returncode == 0, ran.stderr
        # Match quality, visible: accepted and refused by reason, per dataset (no warning: 0.3% is under 5%).
        assert ("identifiers accounts.phone: 1,000 accepted, 3 refused (invalid_characters 1, invalid_country_code 1, invalid_length 1)"
                in ran.stdout), ran.stdout
        assert "identifiers subscribers.msisdn: 1,000 accepted, 0 refused" in ran.stdout, ran.stdout
        assert "warning" not in ran.stderr, ran.stderr
        # Changed by normalisation: every accepted number not written as its E.164 already.
        for dataset, column, rows in (("accounts", "phone", accounts), ("subscribers", "msisdn", subscribers)):
            changed = sum(1 for written, _ in rows if written not in bad and written != _e164(written))
            assert 0 < changed < len(rows)
            assert f"identifiers {dataset}.{column}: " in ran.stdout and f"; {changed:,} of those accepted changed by normalisation" in ran.stdout, ran.stdout
        overlap = dcr("overlap", "phones", "--format", "json")
        assert overlap.returncode == 0, overlap.stderr
        matched = json.loads(overlap.stdout)["rows"][0]["matched_people"]
        # The reference: pandas over the library's own E.164 of each written number.
        bank = {_e164(p) for p, _ in accounts} - {None}
        telecom = {_e164(p) for p, _ in subscribers} - {None}
        assert matched == len(bank & telecom) == len(shared)
        audit = dcr("audit", "phones", "--format", "jsonl")
        assert audit.returncode == 0, audit.stderr
        staged = [json.loads(line) for line in audit.stdout.splitlines() if "accounts" in line and "rejected_phone" in line]
        assert staged, "the staging step reports its rejections"
        meta = staged[-1]["metadata"]
        assert {k: v for k, v in meta.items() if k.startswith("rejected_phone_")} == {
            "rejected_phone_invalid_characters": 1, "rejected_phone_invalid_length": 1, "rejected_phone_invalid_country_code": 1}
        # Each party's report shows its own identifiers' quality, and not the other's.
        for member, own, other in (("bank", "accounts", "subscribers"), ("telecom", "subscribers", "accounts")):
            written = dcr("report", "phones", "--member", member, "--out", str(tmp_path / member))
            assert written.returncode == 0, written.stderr
            page = (tmp_path / member / "index.html").read_text()
            assert f"<td>{own}</td>" in page and f"<td>{other}</td>" not in page
        assert "invalid_country_code 1" in (tmp_path / "bank" / "index.html").read_text()
    finally:
        dcr("db", "stop")
