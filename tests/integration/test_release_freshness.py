"""A release is built from exactly the data it names: an upload that has not been staged yet is never answered under
its label, and a later release over the staged new data is not taken for the earlier one.

(An outside test ingested a changed file through the landing sensor: the next release was labelled with the new upload
but counted the old staged rows, and after `dcr run` the store kept serving that answer as "identical".)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import ad_hoc_run_config, analysis_run_config, collaboration_keys, ingest_run_config, materialize

from .conftest import land, make_collaboration

pytestmark = pytest.mark.slow
COLLAB = "fresh"


@pytest.fixture(scope="module")
def fresh(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("fresh_policies")
    make_collaboration(root, COLLAB, groups=3, budget=100.0)
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / COLLAB, rows=1_200, overlap=0.5, seed=13)
    land(files, settings.landing, COLLAB)
    defs = build_definitions(settings)
    assert materialize(defs, collaboration_keys(defs, COLLAB), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {})).success
    return {"defs": defs, "files": files, "settings": settings, "url": runtime.warehouse.url()}


def _release(fresh: dict[str, Any]) -> Any:
    return materialize(fresh["defs"], [naming.release_key(COLLAB, "campaign_reach")], instance=dg.DagsterInstance.get())


def _charges(fresh: dict[str, Any]) -> int:
    with psycopg.connect(fresh["url"]) as conn:
        return int(conn.execute(f"select count(*) from {naming.results_schema(COLLAB)}.budget_ledger").fetchone()[0])  # type: ignore[index]


def test_an_upload_not_yet_staged_is_never_answered_and_the_new_staged_data_is_not_taken_for_the_old(fresh: dict[str, Any]) -> None:
    first = _release(fresh)
    assert first.success, first.failure
    meta = first.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    charges = _charges(fresh)
    # A changed purchases file is ingested on its own (as the landing sensor does), not staged.
    changed = pd.read_csv(fresh["files"].purchases)
    changed["purchase_value"] = changed["purchase_value"] * 3
    path = fresh["settings"].landing / COLLAB / "retailer" / "purchases" / "purchases_v2.csv"
    changed.to_csv(path, index=False)
    ingested = materialize(fresh["defs"], [naming.raw_key(COLLAB, "purchases")], instance=dg.DagsterInstance.get(),
                           run_config=ingest_run_config(COLLAB, "purchases"))
    assert ingested.success, ingested.failure
    stale = _release(fresh)
    assert stale.run_success and stale.refused and "retailer.purchases changed since the data was staged" in (stale.failure or "")
    assert _charges(fresh) == charges, "a refused release charges nothing"
    # Ad-hoc SQL reads the same staged data: refused the same way, exact or differentially private.
    for sql_text in ("select i.campaign_id, count(*) as n from impressions as i group by 1", "select c.loyalty_tier, count(*) as n from impressions as i inner join customers as c on c.customer_email = i.user_email group by 1"):
        asked = materialize(fresh["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(),
                            run_config=ad_hoc_run_config(COLLAB, "ad_network", sql_text))
        assert asked.refused and "retailer.purchases changed since the data was staged" in (asked.failure or "") and "(stale data)" in asked.failure
    assert _charges(fresh) == charges
    # Once the pipeline has staged it, the release is a new one, labelled with the new upload, over the new values.
    assert materialize(fresh["defs"], collaboration_keys(fresh["defs"], COLLAB), instance=dg.DagsterInstance.get(),
                       run_config=analysis_run_config(COLLAB, {})).success
    second = _release(fresh)
    assert second.success, second.failure
    meta2 = second.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    assert not meta2["cached"] and meta2["release_id"] != meta["release_id"] and _charges(fresh) == charges + 1
    assert meta2["input_versions"]["retailer.purchases"] != meta["input_versions"]["retailer.purchases"]
    assert meta2["input_versions"]["ad_network.impressions"] == meta["input_versions"]["ad_network.impressions"]
    # The same request again is the same data: answered from the store, free.
    third = _release(fresh)
    meta3 = third.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    assert meta3["cached"] and meta3["release_id"] == meta2["release_id"] and _charges(fresh) == charges + 1


def _dagster_causes(fresh: dict[str, Any], key: list[str]) -> list[tuple[str, list[str] | None, str | None]]:
    """Dagster's own verdict on an asset, from the data and code versions in its event log (what the UI shows):
    (status, the asset that is the root cause, why) per root cause; [("FRESH", None, None)] when fresh."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    instance = dg.DagsterInstance.get()
    graph = fresh["defs"].resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None), instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    status = resolver.get_status(dg.AssetKey(key)).value
    causes = resolver.get_stale_root_causes(dg.AssetKey(key))
    return [(status, list(c.key.asset_key.path), c.reason) for c in causes] or [(status, None, None)]


def _landing_tick(fresh: dict[str, Any]) -> Any:
    from dcr_pipelines.defs.resources import WarehouseResource

    sensor = fresh["defs"].resolve_sensor_def(f"{COLLAB}__landing_files")
    with dg.build_sensor_context(instance=dg.DagsterInstance.get(), resources={"warehouse": WarehouseResource(url=fresh["url"])}) as context:
        return sensor.evaluate_tick(context)


def test_the_landing_sensor_brings_the_stages_up_to_date_after_an_upload_and_never_releases(fresh: dict[str, Any]) -> None:
    """The sensor's uploads lead to fresh answers: once a new upload is in and nothing waits, the sensor asks for one run
    of the stages after ingest (staging, matching, analysis), never a release; then the release answers over the new data."""
    assert "staged data are the current uploads" in _landing_tick(fresh).skip_message
    changed = pd.read_csv(fresh["files"].impressions)
    changed = changed[changed.index % 2 == 0]  # half the impressions: a different answer
    path = fresh["settings"].landing / COLLAB / "ad_network" / "impressions" / "impressions_v2.csv"
    changed.to_csv(path, index=False)
    first = _landing_tick(fresh)  # a new file: its ingest first, nothing else
    assert [r.asset_selection for r in first.run_requests] == [[dg.AssetKey(naming.raw_key(COLLAB, "impressions"))]]
    again = _landing_tick(fresh)  # the upload still waits: the same ingest request (Dagster runs a run key once), no refresh
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    ingested = materialize(fresh["defs"], [k.path for k in first.run_requests[0].asset_selection], instance=dg.DagsterInstance.get(),
                           run_config=ingest_run_config(COLLAB, "impressions"))
    assert ingested.success, ingested.failure
    assert _release(fresh).refused, "stale until the stages have run"
    # Dagster's data versions say the same: every stage that read the upload is stale, from the upload's new version.
    # Dagster's data versions say the same: the stage that read the upload is stale, caused by the upload's new version
    # (later stages carry versions of their own, so Dagster names the first one; the release check refuses for all).
    causes = _dagster_causes(fresh, naming.normalised_key(COLLAB, "impressions"))
    assert causes == [("STALE", naming.raw_key(COLLAB, "impressions"), "has a new data version")], causes
    assert _dagster_causes(fresh, naming.normalised_key(COLLAB, "customers")) == [("FRESH", None, None)], "a stage that did not read it is not"
    refresh = _landing_tick(fresh)
    [request] = refresh.run_requests
    selected = {tuple(k.path) for k in request.asset_selection}
    assert tuple(naming.cross_reference_key(COLLAB)) in selected and tuple(naming.analysis_key(COLLAB, "campaign_reach")) in selected
    assert tuple(naming.staging_key(COLLAB, "impressions")) in selected
    assert not [k for k in selected if k[1] in ("results", "raw")], "never a release (they spend budget), nor an ingest"
    assert request.tags["dcr/refresh"] == "ad_network.impressions" and request.run_key.startswith("refresh:")
    assert _landing_tick(fresh).run_requests[0].run_key == request.run_key, "one run per set of current versions (the run key)"
    ran = materialize(fresh["defs"], [k.path for k in request.asset_selection], instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert ran.success, ran.failure
    assert "staged data are the current uploads" in _landing_tick(fresh).skip_message
    for key in (naming.normalised_key(COLLAB, "impressions"), naming.staging_key(COLLAB, "impressions"),
                naming.cross_reference_key(COLLAB), naming.analysis_key(COLLAB, "campaign_reach")):
        assert _dagster_causes(fresh, key) == [("FRESH", None, None)], key
    released = _release(fresh)
    assert released.success and not released.refused
    meta = released.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    with psycopg.connect(fresh["url"]) as conn:
        current = conn.execute("select checksum from dcr_meta.dataset_versions where collaboration = %s and party = 'ad_network' "
                               "and dataset = 'impressions' and is_current", (COLLAB,)).fetchone()
    assert meta["input_versions"]["ad_network.impressions"] == {"checksum": current[0]}, "labelled with, and built from, the new upload"


def _staged(fresh: dict[str, Any]) -> Any:
    from dcr_pipelines.defs import freshness
    from dcr_pipelines.lib.policy import load_collaboration

    loaded = load_collaboration(fresh["settings"].policies / COLLAB)
    with psycopg.connect(fresh["url"]) as conn:
        return freshness.staged(dg.DagsterInstance.get(), conn, loaded)


def test_the_same_content_again_is_the_same_data_version_fresh_and_free(fresh: dict[str, Any]) -> None:
    """A re-delivered file with the content already loaded is a new raw event with the same data version (the content
    checksum): nothing is stale, and the same request is answered from the store without a charge."""
    assert materialize(fresh["defs"], collaboration_keys(fresh["defs"], COLLAB), instance=dg.DagsterInstance.get(),
                       run_config=analysis_run_config(COLLAB, {})).success
    first = _release(fresh)
    assert first.success, first.failure
    charges = _charges(fresh)
    instance = dg.DagsterInstance.get()
    raw = dg.AssetKey(naming.raw_key(COLLAB, "customers"))
    before = instance.get_latest_data_version_record(raw, False)
    again = fresh["settings"].landing / COLLAB / "retailer" / "customers" / "customers_again.csv"
    again.write_bytes(fresh["files"].customers.read_bytes())
    assert materialize(fresh["defs"], [raw.path], instance=instance, run_config=ingest_run_config(COLLAB, "customers")).success
    after = instance.get_latest_data_version_record(raw, False)
    assert after.storage_id > before.storage_id, "the ingest is a new event in the log"
    assert after.event_log_entry.tags["dagster/data_version"] == before.event_log_entry.tags["dagster/data_version"]
    assert not _staged(fresh).stale
    second = _release(fresh)
    meta = second.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    assert second.success and meta["cached"] and _charges(fresh) == charges, "identical content: the stored answer, free"


def test_a_version_the_event_log_never_recorded_is_refused_until_recorded_and_staged(fresh: dict[str, Any]) -> None:
    """The warehouse changed and the command that changed it died before its Dagster event (here: the service called
    without Dagster). The gate, which reads the event log, does not take the staged data for current: the release and
    ad-hoc SQL refuse naming the cause; the landing sensor records the version as the raw asset's data version and asks
    for the stages; after them the release is labelled with the new content."""
    from dcr_pipelines.defs.ingest import target
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.services import ingest as ingest_lib

    loaded = load_collaboration(fresh["settings"].policies / COLLAB)
    changed = pd.read_csv(fresh["files"].customers)
    changed = changed[changed.index % 3 != 0]
    (fresh["settings"].landing / COLLAB / "retailer" / "customers" / "customers_v3.csv").write_text(changed.to_csv(index=False))
    t = target(loaded, "customers", fresh["settings"].landing, fresh["url"])
    with psycopg.connect(fresh["url"], autocommit=True) as conn:
        ingest_lib.intake(conn, t)
        outcome = ingest_lib.process_queue(conn, t)
        assert outcome.loaded, "the new version is in the warehouse"
        current = ingest_lib.current_version(conn, t)
    staged = _staged(fresh)
    assert staged.stale == ["retailer.customers"] and "event log has not recorded" in (staged.reason("retailer.customers") or "")
    charges = _charges(fresh)
    refused = _release(fresh)
    assert refused.refused and "retailer.customers changed since the data was staged" in (refused.failure or "")
    asked = materialize(fresh["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(),
                        run_config=ad_hoc_run_config(COLLAB, "ad_network", "select i.campaign_id, count(*) as n from impressions as i group by 1"))
    assert asked.refused and "(stale data)" in (asked.failure or "")
    assert _charges(fresh) == charges
    tick = _landing_tick(fresh)
    [request] = tick.run_requests
    assert request.tags["dcr/refresh"] == "retailer.customers"
    recorded = dg.DagsterInstance.get().get_latest_data_version_record(dg.AssetKey(naming.raw_key(COLLAB, "customers")), False)
    assert recorded.event_log_entry.tags["dagster/data_version"] == current.checksum, "recorded as the raw asset's data version"
    assert recorded.event_log_entry.run_id == "", "a runless event: no run made it"
    ran = materialize(fresh["defs"], [k.path for k in request.asset_selection], instance=dg.DagsterInstance.get(), run_config=analysis_run_config(COLLAB, {}))
    assert ran.success, ran.failure
    assert not _staged(fresh).stale
    released = _release(fresh)
    assert released.success and not released.refused, released.failure
    meta = released.metadata["/".join(naming.release_key(COLLAB, "campaign_reach"))]
    assert meta["input_versions"]["retailer.customers"] == {"checksum": current.checksum}
