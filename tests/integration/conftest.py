"""The ``e2e`` collaboration: a copy of the demo, materialized once per test session through Dagster.

Its query has contribution limits wide enough that nothing is capped, so
pre-noise aggregates can be compared exactly with pandas on the plain
files, and a single receiver (ad_network), so result access can be tested.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.identifiers import token
from dcr_pipelines.lib.policy import load_collaboration, query_sha256
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize

COLLAB = "e2e"
ROWS, OVERLAP, SEED = 1_500, 0.4, 5


CANARY = {"retailer": "5ec7e7ca" * 8, "ad_network": "0ddba11c" * 8, "pairing": "feedface" * 8}


ONLY_QUERY = "campaign_reach"


def make_collaboration(root: Path, name: str, *, groups: int, budget: float = 10.0, receivers: str = "[ad_network, retailer]") -> Path:
    """A copy of the demo named ``name`` with one approved query (campaign_reach): its group limit and receivers
    set, approvals re-signed. (The demo's other queries are tested in test_ad_hoc.py.)"""
    folder = root / name
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    for extra in (folder / "queries").iterdir():
        if extra.stem != ONLY_QUERY:
            extra.unlink()
    collab = folder / "collaboration.yaml"
    spec = folder / "queries" / "campaign_reach.yaml"
    text = spec.read_text().replace("max_groups_per_unit: 3", f"max_groups_per_unit: {groups}")
    spec.write_text(text.replace("receivers: [ad_network, retailer]", f"receivers: {receivers}"))
    old = load_collaboration(PROJECT_ROOT / "policies" / "demo").queries["campaign_reach"].sha256
    new = query_sha256((folder / "queries" / "campaign_reach.sql").read_text(), spec.read_text())
    text = collab.read_text().replace("name: demo", f"name: {name}").replace(old, new)
    head, rest = text.split("\napprovals:\n")
    approvals, tail = rest.split("\nschedules:")
    approvals = re.sub(r"(?m)^  (?!" + ONLY_QUERY + r":)\w+:\n(?:    .*\n)+", "", approvals)
    text = head + "\napprovals:\n" + approvals + "\nschedules:" + tail
    # The tests replace uploads file by file; append mode has tests of its own (test_uploads.py).
    text = text.replace("    mode: append", "    mode: replace")
    collab.write_text(text.replace("epsilon: 10.0", f"epsilon: {budget}"))
    approve_all(folder)  # every party approves the copy's queries and protections
    return folder


@pytest.fixture(scope="session")
def e2e(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("policies")
    make_collaboration(root, COLLAB, groups=24, receivers="[ad_network]")
    settings = dataclasses.replace(runtime.settings, policies=root)
    # Recognisable keys, so that a test can search every artefact for them.
    os.environ[secret_env_name("HMAC", COLLAB, "retailer")] = CANARY["retailer"]
    os.environ[secret_env_name("HMAC", COLLAB, "ad_network")] = CANARY["ad_network"]
    os.environ[secret_env_name("PAIRING", COLLAB)] = CANARY["pairing"]
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=ROWS, overlap=OVERLAP, seed=SEED)
    with files.purchases.open("a") as handle:  # identifiers that cannot be normalised (1% are tolerated)
        handle.write("not-an-email,10.0,2026-02-01,north\nstill@bad,5.0,2026-02-02,east\n")
    land(files, settings.landing, COLLAB)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return {"defs": defs, "files": files, "outcome": outcome, "url": runtime.warehouse.url(), "settings": settings, "root": root}


def land(files: demo_data.DemoFiles, landing: Path, collab: str) -> None:
    """Copy generated uploads into the landing folders (ingest archives what it accepts)."""
    for path in files.uploads:
        target = landing / collab / path.parent.parent.name / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def expected_campaign_reach(files: demo_data.DemoFiles, since: str = "2026-01-01") -> pd.DataFrame:
    """The campaign_reach question answered on the plain files (what the clean room must match)."""
    p = pd.read_csv(files.purchases)
    i = pd.read_csv(files.impressions)
    p["email"] = p["customer_email"].str.strip().str.lower()
    i["email"] = i["user_email"].str.strip().str.lower()
    p = p[(p["purchase_value"] >= 0) & (p["purchase_date"] >= since)]
    i = i[i["impression_time"] >= since]
    exposed = i[["email", "campaign_id"]].drop_duplicates()
    spend = p.groupby(["email", "store_region"], as_index=False)["purchase_value"].sum()
    joined = exposed.merge(spend, on="email")
    joined["clamped"] = joined["purchase_value"].clip(0, 300)
    out = joined.groupby(["campaign_id", "store_region"]).agg(buyers=("email", "nunique"), spend=("clamped", "sum"))
    return out.reset_index()




def checkout_copy(tmp_path: Path, dotenv: str | None = None) -> Path:
    """The checkout as `dg` sees it, without the developer's own `.env` (which names their deployment, not the test's);
    ``dotenv``: the `.env` to put there instead."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("pyproject.toml", "workspace.yaml", "dagster.yaml"):
        shutil.copyfile(PROJECT_ROOT / name, root / name)
    for name in (".venv", "dcr_pipelines", "dbt_project", "policies"):
        (root / name).symlink_to(PROJECT_ROOT / name)
    if dotenv is not None:
        (root / ".env").write_text(dotenv)
    return root


def cross_reference_pairs(url: str, collab: str) -> set[tuple[str, str]]:
    """(retailer token, ad network token) of every cross-reference row of a demo copy."""
    with psycopg.connect(url) as conn:
        return set(conn.execute(sql.SQL("select {}, {} from {}").format(
            sql.Identifier(naming.party_token_column("retailer")), sql.Identifier(naming.party_token_column("ad_network")),
            sql.Identifier(naming.matching_schema(collab), "cross_reference"))).fetchall())


def file_emails(path: Path, column: str) -> set[str]:
    return set(pd.read_csv(path)[column].dropna().str.strip().str.lower())


def expected_pairs(keys: dict[str, str], purchases: Path, customers: Path, impressions: Path) -> set[tuple[str, str]]:
    """The token pairs of the people both parties hold, computed from the plain files and the parties' HMAC keys."""
    shared = (file_emails(purchases, "customer_email") | file_emails(customers, "customer_email")) & file_emails(impressions, "user_email")
    return {(token(bytes.fromhex(keys["retailer"]), e), token(bytes.fromhex(keys["ad_network"]), e)) for e in shared}
