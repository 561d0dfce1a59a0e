"""Key epochs and proportional staging, through real Dagster runs, dbt, openmined-psi and PostgreSQL.

The ``epochs`` collaboration is the demo with ``matching.key_epoch: 7d``. After
the first match, a replaced impressions file (some people gone, some new)
must give exactly the plain intersection, with only the new identities
blinded; the retailer's unchanged datasets must not be rebuilt by dbt.
Ending the epoch (``key_epoch: run``) deletes the kept keys and values.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize

from .conftest import cross_reference_pairs, expected_pairs, file_emails, land, make_collaboration

pytestmark = pytest.mark.slow
COLLAB = "epochs"
KEYS = {"retailer": "e90c4a" * 10 + "abcd", "ad_network": "5eed11" * 10 + "dcba"}


def _run(ctx: dict[str, Any]) -> Any:
    defs = build_definitions(ctx["settings"])
    outcome = materialize(defs, collaboration_keys(defs, COLLAB), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return outcome


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("epoch_policies")
    folder = make_collaboration(root, COLLAB, groups=24)
    path = folder / "collaboration.yaml"
    path.write_text(path.read_text().replace("  padding: false\n", "  padding: false\n  key_epoch: 7d\n"))
    approve_all(folder)
    settings = dataclasses.replace(runtime.settings, policies=root)
    for party, key in KEYS.items():
        os.environ[secret_env_name("HMAC", COLLAB, party)] = key
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=1_500, overlap=0.4, seed=61)
    land(files, settings.landing, COLLAB)
    ctx = {"settings": settings, "files": files, "url": runtime.warehouse.url(), "folder": folder}
    ctx["first"] = _run(ctx)
    return ctx


def _pairs(url: str) -> set[tuple[str, str]]:
    return cross_reference_pairs(url, COLLAB)


def _expected(purchases: Path, customers: Path, impressions: Path) -> set[tuple[str, str]]:
    return expected_pairs(KEYS, purchases, customers, impressions)


def test_the_first_match_of_an_epoch_blinds_everyone_and_matches_the_plain_intersection(ctx: dict[str, Any]) -> None:
    meta = ctx["first"].metadata[f"{COLLAB}/matching/cross_reference"]
    f = ctx["files"]
    assert meta["key_epoch"] == "7d" and meta["key_epoch_started"] is True
    retailer = file_emails(f.purchases, "customer_email") | file_emails(f.customers, "customer_email")
    assert meta["identities_blinded"] == len(retailer) + len(file_emails(f.impressions, "user_email"))
    assert _pairs(ctx["url"]) == _expected(f.purchases, f.customers, f.impressions)


def test_a_changed_upload_blinds_only_new_identities_and_rebuilds_only_its_dataset(ctx: dict[str, Any], tmp_path: Path) -> None:
    f = ctx["files"]
    frame = pd.read_csv(f.impressions)
    kept = frame.iloc[: len(frame) * 9 // 10]  # some people leave
    more = pd.read_csv(demo_data.generate(tmp_path / "more", rows=400, overlap=0.5, seed=62).impressions)
    changed = pd.concat([kept, more])
    new_file = tmp_path / "impressions.csv"
    changed.to_csv(new_file, index=False)
    target = ctx["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions.csv"
    target.write_bytes(new_file.read_bytes())
    before = file_emails(f.impressions, "user_email")
    outcome = _run(ctx)
    meta = outcome.metadata[f"{COLLAB}/matching/cross_reference"]
    after = file_emails(new_file, "user_email")
    assert meta["key_epoch_started"] is False
    assert meta["identities_blinded"] == len(after - before) > 0
    assert _pairs(ctx["url"]) == _expected(f.purchases, f.customers, new_file)
    # the retailer's datasets did not change: dbt did not rebuild them, their models report recomputed: false
    assert outcome.metadata[f"{COLLAB}/private/norm_purchases"]["recomputed"] is False
    assert "recomputed" not in outcome.metadata[f"{COLLAB}/private/norm_impressions"]


def _epoch_rows(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        counts = [conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(naming.matching_schema(COLLAB), t))).fetchone()
                  for t in ("psi_epoch", "psi_epoch_values")]
    return int(counts[0][0]), int(counts[1][0])  # type: ignore[index]


def test_an_epoch_whose_time_is_up_is_deleted_even_when_nothing_changed(ctx: dict[str, Any]) -> None:
    assert _epoch_rows(ctx["url"])[0] == 2
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        conn.execute(sql.SQL("update {} set started_at = now() - interval '8 days'").format(sql.Identifier(naming.matching_schema(COLLAB), "psi_epoch")))
    outcome = _run(ctx)
    assert outcome.metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is False  # identities unchanged: no PSI work
    assert _epoch_rows(ctx["url"]) == (0, 0)


def test_ending_the_epoch_deletes_its_keys_and_values(ctx: dict[str, Any], tmp_path: Path) -> None:
    more = pd.read_csv(demo_data.generate(tmp_path / "more", rows=100, overlap=0.5, seed=63).impressions)
    target = ctx["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions.csv"
    pd.concat([pd.read_csv(ctx["files"].impressions), more]).to_csv(target, index=False)
    _run(ctx)  # a new epoch starts with the new identities
    assert _epoch_rows(ctx["url"])[0] == 2
    path = ctx["folder"] / "collaboration.yaml"
    path.write_text(path.read_text().replace("  key_epoch: 7d\n", "  key_epoch: run\n"))
    approve_all(ctx["folder"])
    _run(ctx)  # identities unchanged: the cross-reference is kept, the epoch's keys are not
    assert _epoch_rows(ctx["url"]) == (0, 0)
