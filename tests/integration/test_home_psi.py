"""A party that keeps its identifiers at home, through real Dagster runs on PostgreSQL and the `dcr psi` commands.

The ad network of ``homepsi`` (a copy of policies/demo_home) tokenises its
impressions and writes its PSI setup message in a folder that stands for its
own machine; the operator (this deployment) sees only those files and the
answer to its request. The matched people must equal the plain intersection
of normalised emails, the campaign_reach aggregates before noise must equal
pandas on the plain files, and no identifier of the ad network outside the
intersection, and neither of its keys, may appear anywhere the operator
keeps things: files, the warehouse, the Dagster event log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
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
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.policy.loader import query_sha256
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services.release import OVERLAP_CONSUMER, release_overlap
from dcr_pipelines.store import access, ledger

from .conftest import expected_campaign_reach

COLLAB = "homepsi"
RETAILER_KEY = "7e7a11e5" * 8


def _cli(*args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    """The party's own command line, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == code, proc.stderr
    return proc.stdout + proc.stderr


def _run(ctx: dict[str, Any]) -> Any:
    return materialize(ctx["defs"], collaboration_keys(ctx["defs"], COLLAB, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("home_policies")
    folder = root / COLLAB
    shutil.copytree(PROJECT_ROOT / "policies" / "demo_home", folder)
    path = folder / "collaboration.yaml"
    # No contribution bound bites (24 groups per person), so the pre-noise table equals the plain aggregate; re-approved.
    spec = folder / "queries" / "campaign_reach.yaml"
    old_hash = query_sha256((folder / "queries" / "campaign_reach.sql").read_text(), spec.read_text())
    spec.write_text(spec.read_text().replace("max_groups_per_unit: 3", "max_groups_per_unit: 24"))
    new_hash = query_sha256((folder / "queries" / "campaign_reach.sql").read_text(), spec.read_text())
    path.write_text(path.read_text().replace("name: demo_home", f"name: {COLLAB}").replace(old_hash, new_hash))
    settings = dataclasses.replace(runtime.settings, policies=root)
    os.environ[secret_env_name("HMAC", COLLAB, "retailer")] = RETAILER_KEY
    ensure_development_secrets(settings.home, secret_names(settings))
    assert secret_env_name("HMAC", COLLAB, "ad_network") not in secret_names(settings), "the operator holds no key of a party at home"

    party_machine = tmp_path_factory.mktemp("ad_network_machine")  # outside the operator's home
    files = demo_data.generate(party_machine / "generated", rows=1_500, overlap=0.4, seed=33)
    _mark_their_own_people(files)
    for upload in (files.purchases, files.customers):
        target = settings.landing / COLLAB / "retailer" / upload.parent.name / upload.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(upload, target)
    key = party_machine / "ad_network.key"
    _cli("psi", "keygen", "--out", str(key))
    outbox = party_machine / "outbox"
    printed = _cli("psi", "prepare", COLLAB, "--member", "ad_network", "--key", str(key), "--policies", str(root),
                   "--dataset", f"impressions={files.impressions}", "--out", str(outbox))
    assert "impressions: 1,500 of 1,500 rows tokenised" in printed
    upload = settings.landing / COLLAB / "ad_network" / "impressions" / "impressions.csv"
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outbox / "impressions.csv", upload)
    psi_folder = settings.landing / COLLAB / "ad_network" / "_psi"
    psi_folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(outbox / "ad_network-setup.dcrpsi", psi_folder / "ad_network-setup.dcrpsi")

    ctx = {"defs": build_definitions(settings), "settings": settings, "files": files, "key": key, "party_machine": party_machine,
           "url": runtime.warehouse.url(), "dagster_url": runtime.dagster_url, "psi_folder": psi_folder}
    first = _run(ctx)
    ctx["first"] = first
    requests = sorted((settings.exports / COLLAB / "ad_network" / "psi").glob("*request*.dcrpsi"))
    ctx["requests"] = requests
    if requests:
        _cli("psi", "respond", COLLAB, "--member", "ad_network", "--key", str(key), "--request", str(requests[-1]), "--out", str(outbox))
        for answer in outbox.glob("*response*.dcrpsi"):
            shutil.copyfile(answer, psi_folder / answer.name)
    ctx["second"] = _run(ctx)
    return ctx


def _normalised(series: pd.Series) -> set[str]:
    return set(series.str.strip().str.lower())


MARK = "+h0me7"  # other tests generate the same demo emails; the ad network's own people get a unique tag


def _mark_their_own_people(files: demo_data.DemoFiles) -> None:
    retailer = _normalised(pd.read_csv(files.purchases)["customer_email"]) | _normalised(pd.read_csv(files.customers)["customer_email"])
    impressions = pd.read_csv(files.impressions)
    own = ~impressions["user_email"].str.strip().str.lower().isin(retailer)
    impressions.loc[own, "user_email"] = impressions.loc[own, "user_email"].str.replace("@", MARK + "@", n=1, regex=False)
    impressions.to_csv(files.impressions, index=False)


def test_the_operator_waits_for_the_home_party_then_completes_the_match(ctx: dict[str, Any]) -> None:
    assert not ctx["first"].success and ctx["first"].waiting
    assert "waiting for the PSI answer" in ctx["first"].failure and "dcr psi respond" in ctx["first"].failure
    assert len(ctx["requests"]) == 1
    assert ctx["second"].success, ctx["second"].failure


def test_waiting_for_the_home_party_is_a_green_run_with_an_observation(ctx: dict[str, Any]) -> None:
    instance = dg.DagsterInstance.get()
    run = instance.get_run_by_id(ctx["first"].run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags.get("dcr/outcome") == "waiting"  # the runs list shows it waits (not done, not failed)
    observed = instance.fetch_observations(dg.AssetKey(naming.cross_reference_key(COLLAB)), limit=50).records
    waits = [r for r in observed if r.run_id == ctx["first"].run_id]
    assert waits and waits[0].asset_observation.metadata["outcome"].value == "waiting"
    assert waits[0].asset_observation.metadata["waiting_for"].value == "ad_network"


def test_a_psi_message_landing_launches_the_pipeline_job_once(ctx: dict[str, Any]) -> None:
    sensor = next(s for s in ctx["defs"].sensors if s.name == f"{COLLAB}__psi_answers")
    assert sensor.job_name == f"{COLLAB}__all"
    with dg.build_sensor_context(instance=dg.DagsterInstance.get()) as context:
        requests = sensor.evaluate_tick(context).run_requests or []
    landed = sorted(p.name for p in ctx["psi_folder"].glob("*.dcrpsi"))
    assert any("response" in name for name in landed)
    assert sorted(r.run_key.split(":")[0] for r in requests) == landed  # one run per message file (run keys: once each)


def test_matches_equal_the_plain_intersection_with_each_partys_token(ctx: dict[str, Any]) -> None:
    files = ctx["files"]
    retailer = _normalised(pd.read_csv(files.purchases)["customer_email"]) | _normalised(pd.read_csv(files.customers)["customer_email"])
    ad = _normalised(pd.read_csv(files.impressions)["user_email"])
    party_key = bytes.fromhex(json.loads(ctx["key"].read_text())["hmac_key"])
    expected = {(token(bytes.fromhex(RETAILER_KEY), e), token(party_key, e)) for e in retailer & ad}
    with psycopg.connect(ctx["url"]) as conn:
        rows = conn.execute(
            sql.SQL("select {}, {} from {}").format(
                sql.Identifier(naming.party_token_column("retailer")), sql.Identifier(naming.party_token_column("ad_network")),
                sql.Identifier(naming.matching_schema(COLLAB), "cross_reference"),
            )
        ).fetchall()
    assert len(expected) > 100
    assert set(rows) == expected and len(rows) == len(expected)


def test_pre_noise_aggregates_equal_pandas_on_the_plain_files(ctx: dict[str, Any]) -> None:
    expected = expected_campaign_reach(ctx["files"])
    with psycopg.connect(ctx["url"]) as conn:
        got = pd.DataFrame(
            conn.execute(f"select campaign_id, store_region, buyers from {naming.analysis_schema(COLLAB)}.query_campaign_reach").fetchall(),
            columns=["campaign_id", "store_region", "buyers"],
        )
    merged = expected.merge(got, on=["campaign_id", "store_region"], suffixes=("_plain", "_room"))
    assert len(merged) == len(expected) == len(got)
    assert (merged["buyers_plain"] == merged["buyers_room"]).all()


def test_no_identifier_of_the_home_party_outside_the_overlap_nor_its_keys_reach_the_operator(ctx: dict[str, Any]) -> None:
    files, settings = ctx["files"], ctx["settings"]
    retailer = _normalised(pd.read_csv(files.purchases)["customer_email"]) | _normalised(pd.read_csv(files.customers)["customer_email"])
    raw = pd.read_csv(files.impressions)["user_email"]
    only_theirs = sorted(_normalised(raw) - retailer)
    assert len(only_theirs) > 100 and all(MARK in e for e in only_theirs)
    keys = json.loads(ctx["key"].read_text())
    needles = [e.encode() for e in only_theirs] + [keys["hmac_key"].encode(), keys["psi_key"].encode()]
    needles += [bytes.fromhex(keys["hmac_key"]), bytes.fromhex(keys["psi_key"])]
    # Every file the operator keeps: landing (incl. archives and PSI messages), exports, Dagster's home, logs.
    for path in settings.home.rglob("*"):
        if path.is_file() and "pg" not in path.relative_to(settings.home).parts[:1]:
            data = path.read_bytes().lower()
            found = [n for n in needles if n in data]
            assert not found, f"{path} holds {found[0]!r}"
    # Every table of the warehouse and of Dagster's storage, as text.
    for url in {ctx["url"], ctx["dagster_url"]}:
        with psycopg.connect(url) as conn:
            tables = conn.execute(
                "select table_schema, table_name from information_schema.tables "
                "where table_schema not in ('pg_catalog', 'information_schema') and table_type = 'BASE TABLE'"
            ).fetchall()
            text_needles = [n.decode() for n in needles[: len(only_theirs) + 2]]
            for schema, table in tables:
                rows = conn.execute(sql.SQL("select t::text from {} as t").format(sql.Identifier(schema, table))).fetchall()
                blob = "\n".join(r[0] for r in rows).lower()
                found = [n for n in text_needles if n in blob]
                assert not found, f"{schema}.{table} holds {found[0]!r}"


def test_a_rerun_with_nothing_changed_does_no_psi_work(ctx: dict[str, Any]) -> None:
    again = _run(ctx)
    assert again.success, again.failure
    assert again.metadata[f"{COLLAB}/matching/cross_reference"]["recomputed"] is False


def test_a_tampered_answer_is_refused_and_the_cross_reference_is_kept(ctx: dict[str, Any]) -> None:
    with psycopg.connect(ctx["url"]) as conn:
        before = conn.execute(f"select match_id from {naming.matching_schema(COLLAB)}.cross_reference order by 1").fetchall()
    # A new retailer upload changes the client set: a new request, and an old answer must not be used for it.
    customers = pd.read_csv(ctx["files"].customers)
    extra = customers.head(1).assign(customer_email="new.person@example.com")
    target = ctx["settings"].landing / COLLAB / "retailer" / "customers" / "customers_2.csv"
    pd.concat([customers, extra]).to_csv(target, index=False)
    (old_answer,) = ctx["psi_folder"].glob("*response*.dcrpsi")
    data = bytearray(old_answer.read_bytes())
    data[-1] ^= 1
    outcome = _run(ctx)
    assert not outcome.success and "waiting for the PSI answer" in outcome.failure
    (request,) = [r for r in (ctx["settings"].exports / COLLAB / "ad_network" / "psi").glob("*request*.dcrpsi") if r not in ctx["requests"]]
    rid = request.name.split("-")[-1].split(".")[0]
    forged = ctx["psi_folder"] / f"ad_network-response-{rid}.dcrpsi"
    forged.write_bytes(bytes(data))
    outcome = _run(ctx)
    assert not outcome.success
    assert f"ad_network-response-{rid}.dcrpsi" in outcome.failure and "previous cross-reference kept" in outcome.failure
    with psycopg.connect(ctx["url"]) as conn:
        after = conn.execute(f"select match_id from {naming.matching_schema(COLLAB)}.cross_reference order by 1").fetchall()
    assert after == before


def test_the_psi_commands_refuse_bad_input_with_one_line(ctx: dict[str, Any], tmp_path: Path) -> None:
    root = str(ctx["settings"].policies)
    out = _cli("psi", "prepare", COLLAB, "--member", "retailer", "--key", str(ctx["key"]), "--policies", root,
               "--dataset", f"purchases={ctx['files'].purchases}", "--out", str(tmp_path), code=2)
    assert "'retailer' is not listed in matching.home_parties of homepsi" in out
    bad = tmp_path / "request.dcrpsi"
    data = bytearray(ctx["requests"][0].read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = _cli("psi", "respond", COLLAB, "--member", "ad_network", "--key", str(ctx["key"]), "--request", str(bad), "--out", str(tmp_path), code=2)
    assert "request.dcrpsi: the body does not match its checksum" in out
    out = _cli("psi", "keygen", "--out", str(ctx["key"]), code=2)
    assert "exists; keys are not overwritten" in out


def test_members_learn_the_overlap_only_with_dp_noise_charged_once_per_match(ctx: dict[str, Any]) -> None:
    schema = naming.results_schema(COLLAB)
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        released = conn.execute(f"select release_id, value, ci_low, ci_high from {schema}.overlap").fetchall()
        charged = conn.execute(f"select count(*), sum(epsilon) from {schema}.budget_ledger where consumer = %s", (OVERLAP_CONSUMER,)).fetchone()
        exact = conn.execute(f"select count(*) from {naming.matching_schema(COLLAB)}.cross_reference").fetchone()[0]
        # Readable by each member that receives results, as that member's role; not by the analysis role.
        for member in ("retailer", "ad_network"):
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(access.role_name(COLLAB, member, "result_reader"))))
            assert conn.execute(f"select count(*) from {schema}.overlap").fetchone()[0] == len(released)
            conn.execute("reset role")
        conn.execute(sql.SQL("set role {}").format(sql.Identifier(access.role_name(COLLAB, "analysis_builder"))))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select * from {schema}.overlap")
        conn.execute("reset role")
    # One release per cross-reference built (the first run stopped before matching; later ones kept the match or were refused).
    assert len(released) == 1 and charged[0] == 1 and charged[1] == pytest.approx(0.1)
    _, value, low, high = released[0]
    assert value == round(value) and high - low > 0  # a noisy integer with its interval
    assert ctx["second"].metadata[f"{COLLAB}/matching/cross_reference"]["overlap_release"] == "dp"
    assert ctx["second"].metadata[f"{COLLAB}/matching/cross_reference"]["matched"] == exact


def test_the_overlap_budget_caps_repeated_releases_then_the_overlap_is_withheld(ctx: dict[str, Any]) -> None:
    """Averaging many releases would reveal the exact size: the 30-day overlap budget (1.0 at 0.1 each) stops it."""
    loaded = load_collaboration(ctx["settings"].policies / COLLAB)
    values = []
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        spent = conn.execute(f"select coalesce(sum(epsilon), 0) from {naming.results_schema(COLLAB)}.budget_ledger where consumer = %s",
                             (OVERLAP_CONSUMER,)).fetchone()[0]
        left = round((1.0 - spent) / 0.1)
        for i in range(left):
            values.append(release_overlap(conn, loaded, 500, f"digest-{i}").rows[0]["value"])
        assert release_overlap(conn, loaded, 500, "digest-0").cached  # the same cross-reference: the same noisy value, no charge
        with pytest.raises(ledger.BudgetExhausted, match=r"privacy budget of \(overlap\)"):
            release_overlap(conn, loaded, 500, "one-more")
    assert len(set(values)) > 1, "each new match draws fresh noise"
    assert all(v != 500 for v in values[:3]) or len(set(values)) > 2


def test_the_audit_chain_includes_the_overlap_release(ctx: dict[str, Any]) -> None:
    """`dcr audit --verify` finds the overlap release made through Dagster in the event log; releases made
    directly in the test above (not through Dagster) are the only ones it reports as missing."""
    proc = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "audit", COLLAB, "--verify"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DCR_POLICIES": str(ctx["settings"].policies)})
    with psycopg.connect(ctx["url"]) as conn:
        rows = conn.execute(
            f"select release_id, input_versions->>'cross_reference' from {naming.results_schema(COLLAB)}.releases where query_name = 'overlap' order by seq"
        ).fetchall()
    through_dagster = [rid for rid, digest in rows if not digest.startswith(("digest-", "one-more"))]
    direct = [rid for rid, digest in rows if digest.startswith("digest-")]
    assert len(through_dagster) == 1
    assert through_dagster[0] not in proc.stderr + proc.stdout
    flagged = {line.split()[2].rstrip(":") for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert flagged <= set(direct), proc.stderr
