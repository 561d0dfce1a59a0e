"""The default matching streams identities bucket by bucket, through real Dagster runs, openmined-psi and PostgreSQL.

The ``streamed`` collaboration is the demo with ``matching.buckets: 16`` and a
few non-ASCII identifiers. Its cross-reference must equal the plain
intersection, its streamed digest must equal the digest of the same
identities held in memory, and a ``dcr run`` killed at random instants while
it matches must leave the previous cross-reference whole: never a part of
the new one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psutil
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, matching, naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.store import matching as store_matching

from .conftest import cross_reference_pairs, expected_pairs, file_emails, land, make_collaboration

pytestmark = pytest.mark.slow
COLLAB = "streamed"
KEYS = {"retailer": "57ea3d" * 10 + "abcd", "ad_network": "b0c4e7" * 10 + "dcba"}
UNICODE = ["zoë@exämple.de", "李@example.cn", "ωmega@example.gr", "zz@example.com", "ZOË@Exämple.DE"]


def _run(ctx: dict[str, Any]) -> Any:
    defs = build_definitions(ctx["settings"])
    outcome = materialize(defs, collaboration_keys(defs, COLLAB), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return outcome


def _with_unicode(path: Path, column: str) -> None:
    frame = pd.read_csv(path)
    extra = frame.iloc[: len(UNICODE)].copy()
    extra[column] = UNICODE
    pd.concat([frame, extra]).to_csv(path, index=False)


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("streamed_policies")
    folder = make_collaboration(root, COLLAB, groups=24)
    path = folder / "collaboration.yaml"
    path.write_text(path.read_text().replace("  buckets: 2\n", "  buckets: 16\n"))
    from dcr_pipelines.lib.policy.approve import approve_all

    approve_all(folder)
    settings = dataclasses.replace(runtime.settings, policies=root)
    for party, key in KEYS.items():
        os.environ[secret_env_name("HMAC", COLLAB, party)] = key
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=1_200, overlap=0.4, seed=71)
    _with_unicode(files.purchases, "customer_email")
    _with_unicode(files.impressions, "user_email")
    land(files, settings.landing, COLLAB)
    ctx = {"settings": settings, "files": files, "url": runtime.warehouse.url(), "folder": folder,
           "tmp": tmp_path_factory.mktemp("streamed_files")}
    ctx["first"] = _run(ctx)
    return ctx


def _pairs(url: str) -> set[tuple[str, str]]:
    return cross_reference_pairs(url, COLLAB)


def _expected(purchases: Path, customers: Path, impressions: Path) -> set[tuple[str, str]]:
    return expected_pairs(KEYS, purchases, customers, impressions)


def test_the_streamed_match_equals_the_plain_intersection(ctx: dict[str, Any]) -> None:
    f = ctx["files"]
    meta = ctx["first"].metadata[f"{COLLAB}/matching/cross_reference"]
    expected = _expected(f.purchases, f.customers, f.impressions)
    assert {"zoë@exämple.de", "李@example.cn"} <= file_emails(f.purchases, "customer_email") & file_emails(f.impressions, "user_email")
    assert meta["work_buckets"] == 16 and meta["matched"] == len(expected)
    assert _pairs(ctx["url"]) == expected


def test_the_streamed_digest_is_the_digest_of_the_same_identities_held_in_memory(ctx: dict[str, Any]) -> None:
    """The database sorts in code-point order (collate "C"): non-ASCII identifiers digest as Python sorts them."""
    loaded = load_collaboration(ctx["folder"])
    parties = ["ad_network", "retailer"]
    with store_matching.identity_snapshot(ctx["url"], loaded, parties) as snapshot:
        streamed, counts = snapshot.digest("ad_network")
        buckets = list(snapshot.buckets(5))
    inputs = store_matching.read_identities(ctx["url"], loaded, parties)
    assert streamed == matching.input_digest(inputs, "ad_network", loaded.collaboration.matching.buckets)
    assert counts == {inp.party: len(inp.tokens) for inp in inputs}
    for position, inp in enumerate(inputs):  # every identity in exactly one bucket, the one bucket_of names
        streamed_pairs = [(t, i, b) for b, part in buckets for t, i in zip(part[position].tokens, part[position].identifiers, strict=True)]
        assert sorted(streamed_pairs) == sorted((t, i, matching.bucket_of(i, 5)) for t, i in zip(inp.tokens, inp.identifiers, strict=True))


def _matching_started(url: str) -> bool:
    """The run's matching step holds its identity snapshot: its cursors stream the buckets."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("select count(*) from pg_stat_activity where query ilike %s and datname = current_database()",
                            ("%dcr_identities_%",)).fetchone()
    return bool(rows and rows[0])


def test_a_run_killed_at_random_instants_while_matching_keeps_the_previous_cross_reference_whole(ctx: dict[str, Any]) -> None:
    f = ctx["files"]
    before = _pairs(ctx["url"])
    assert before == _expected(f.purchases, f.customers, f.impressions)
    frame = pd.read_csv(f.impressions)
    more = pd.read_csv(demo_data.generate(ctx["tmp"] / "more", rows=600, overlap=0.5, seed=72).impressions)
    changed = ctx["tmp"] / "impressions.csv"
    pd.concat([frame.iloc[: len(frame) * 8 // 10], more]).to_csv(changed, index=False)
    (ctx["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions.csv").write_bytes(changed.read_bytes())
    after = _expected(f.purchases, f.customers, changed)
    assert after != before
    env = {**os.environ, "DCR_POLICIES": str(ctx["settings"].policies), "DCR_LANDING": str(ctx["settings"].landing)}
    rng = random.Random(73)
    killed = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "dcr_pipelines.cli", "run", COLLAB], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not _matching_started(ctx["url"]) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:  # matched before we caught it: the next run has nothing left to kill
            break
        time.sleep(rng.uniform(0.0, 1.0))
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "a PSI process outlived the killed run"
        deadline = time.monotonic() + 30  # the server ends the dead client's transaction; then the table is one whole version
        while _matching_started(ctx["url"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pairs(ctx["url"]) in (before, after), "the cross-reference is neither the previous one nor the new one"
    assert killed >= 1, "no run was caught while matching"
    outcome = _run(ctx)
    assert outcome.metadata[f"{COLLAB}/matching/cross_reference"]["matched"] == len(after)
    assert _pairs(ctx["url"]) == after
    with psycopg.connect(ctx["url"]) as conn:
        leftover = conn.execute("select count(*) from pg_tables where schemaname = %s and tablename = 'cross_reference__new'",
                                (naming.matching_schema(COLLAB),)).fetchone()
    assert leftover == (0,)
