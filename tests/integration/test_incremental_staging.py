"""An append-mode dataset is normalised upload by upload: a new file hashes only its rows, a withdrawn one rebuilds the table.

Real ingest partitions, real dbt (incremental model, the ``dcr_upload_rows`` macro), real PostgreSQL. Rows
already normalised are not rewritten (their ``xmin``, the transaction that wrote them, stays the same), and the
table always equals what a full build would give: one row per row of the dataset, each with its keyed token.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import dagster as dg
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.identifiers import token
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets, secret_env_name
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, ingest_uploads, materialize
from dcr_pipelines.services import ingest

from .conftest import land, make_collaboration

pytestmark = pytest.mark.slow
COLLAB = "incr"
KEY = "1ec0de" * 10 + "abcd"
TABLE = f'"{naming.raw_schema(COLLAB, "ad_network")}"."impressions__normalised"'
VIEW = f'"{naming.raw_schema(COLLAB, "ad_network")}"."impressions"'


def impressions(n: int, start: int) -> str:
    return "user_email,campaign_id,impression_time\n" + "".join(
        f" V{i}@Example.com ,spring_sale,2026-03-{1 + i % 27:02d} 10:00:00\n" for i in range(start, start + n))


@pytest.fixture(scope="module")
def ctx(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("incr_policies")
    folder = make_collaboration(root, COLLAB, groups=24)
    path = folder / "collaboration.yaml"
    path.write_text(path.read_text().replace("    mode: replace", "    mode: append"))
    landing = tmp_path_factory.mktemp("incr_landing")
    settings = dataclasses.replace(runtime.settings, policies=root, landing=landing)
    os.environ[secret_env_name("HMAC", COLLAB, "ad_network")] = KEY
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(tmp_path_factory.mktemp("incr_files"), rows=300, overlap=0.4, seed=71)
    land(files, landing, COLLAB)
    return {"settings": settings, "loaded": load_collaboration(folder), "url": runtime.warehouse.url(), "landing": landing}


def _run(ctx: dict[str, Any]) -> Any:
    defs = build_definitions(ctx["settings"])
    instance = dg.DagsterInstance.get()
    for upload in ingest_uploads(defs, ctx["loaded"], ctx["landing"], ctx["url"], instance=instance):
        assert upload.success, upload.failure
    outcome = materialize(defs, collaboration_keys(defs, COLLAB), instance=instance, run_config=analysis_run_config(COLLAB, {}))
    assert outcome.success, outcome.failure
    return outcome


def _drop(ctx: dict[str, Any], name: str, text: str) -> None:
    inbox = ctx["landing"] / COLLAB / "ad_network" / "impressions"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text(text)


def _rows(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        table = conn.execute(f"select user_email_token, _dcr_part, xmin::text from {TABLE}").fetchall()
        view = [r[0] for r in conn.execute(f"select user_email from {VIEW}").fetchall()]
    ours = [e.strip().lower() for e in view if e and e.startswith(" V")]  # the files this test wrote (the demo's are messier)
    return {"rows": len(table), "view_rows": len(view), "tokens": {r[0] for r in table}, "parts": {r[1] for r in table},
            "xmin": {p: {r[2] for r in table if r[1] == p} for p in {r[1] for r in table}},
            "ours": {token(bytes.fromhex(KEY), e) for e in ours}}


def _consistent(rows: dict[str, Any]) -> None:
    """What a full build gives: one row per row of the dataset, our rows with their keyed tokens."""
    assert rows["rows"] == rows["view_rows"]
    assert rows["ours"] <= rows["tokens"]


def test_a_new_upload_is_normalised_alone_and_a_withdrawn_one_rebuilds_the_table(ctx: dict[str, Any]) -> None:
    _run(ctx)
    first = _rows(ctx["url"])
    _consistent(first)
    assert len(first["parts"]) == 1
    (old_part,) = first["parts"]

    _drop(ctx, "march.csv", impressions(40, 0))
    _run(ctx)
    second = _rows(ctx["url"])
    _consistent(second)
    assert len(second["parts"]) == 2 and len(second["ours"]) == 40
    assert second["xmin"][old_part] == first["xmin"][old_part], "rows already normalised were rewritten"

    _drop(ctx, "april.csv", impressions(25, 40))
    _run(ctx)
    third = _rows(ctx["url"])
    _consistent(third)
    assert len(third["parts"]) == 3 and len(third["ours"]) == 65
    assert third["xmin"][old_part] == first["xmin"][old_part]

    # Withdrawing the first file: its rows cannot be taken back incrementally, so the table is rebuilt from the rest.
    t = ingest.Target(COLLAB, "ad_network", "impressions", ctx["loaded"].collaboration.datasets["impressions"],
                      naming.raw_schema(COLLAB, "ad_network"), ctx["landing"], ctx["url"])
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        ingest.withdraw(conn, t, _first_seq(conn))
    _run(ctx)
    fourth = _rows(ctx["url"])
    _consistent(fourth)
    assert len(fourth["parts"]) == 2 and old_part not in fourth["parts"] and len(fourth["ours"]) == 65
    assert all(fourth["xmin"][p] != third["xmin"][p] for p in fourth["parts"]), "a withdrawal must rebuild the table"


def _first_seq(conn: psycopg.Connection) -> int:
    row = conn.execute("select min(seq) from dcr_meta.uploads where collaboration = %s and party = 'ad_network' and dataset = 'impressions' "
                       "and state = 'accepted'", (COLLAB,)).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def _staged(ctx: dict[str, Any]) -> Any:
    from dcr_pipelines.defs import freshness

    with psycopg.connect(ctx["url"]) as conn:
        return freshness.staged(dg.DagsterInstance.get(), conn, ctx["loaded"])


def test_staleness_of_an_append_dataset_is_read_from_the_event_log_whatever_its_number_of_files(ctx: dict[str, Any]) -> None:
    """Append mode: a withdraw is a raw event whose data version is the dataset's new content, and staging's provenance
    no longer matches it. Dagster's own stale-status resolver ignores a partitioned dependency with 100 or more
    partitions; the gate does not: with 120 partitions, the same content again is fresh and new content is stale."""
    from dcr_pipelines.defs import freshness
    from dcr_pipelines.defs.ingest import partitions_name

    _drop(ctx, "may.csv", impressions(10, 100))
    _run(ctx)
    assert not _staged(ctx).stale
    instance = dg.DagsterInstance.get()
    t = ingest.Target(COLLAB, "ad_network", "impressions", ctx["loaded"].collaboration.datasets["impressions"],
                      naming.raw_schema(COLLAB, "ad_network"), ctx["landing"], ctx["url"])
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        gone = _first_seq(conn)
        version = ingest.withdraw(conn, t, gone)
    assert _staged(ctx).stale == ["ad_network.impressions"], "the warehouse changed, the event log does not know yet"
    from dcr_pipelines.store import uploads as queue

    freshness.record_version(instance, COLLAB, "impressions", version, party="ad_network", partition=queue.partition_key(gone), why="test withdraw")
    staged = _staged(ctx)
    assert staged.stale == ["ad_network.impressions"] and "not yet through staging" in (staged.reason("ad_network.impressions") or "")
    _run(ctx)
    staged = _staged(ctx)
    assert not staged.stale and staged.read["ad_network.impressions"] == version.checksum

    # 120 files' worth of partitions, each re-recorded with the content already staged: one data version, fresh.
    name = partitions_name(COLLAB, "ad_network", "impressions")
    extra = [f"upload-{900000 + i}" for i in range(120)]
    instance.add_dynamic_partitions(name, extra)
    for key in extra:
        freshness.record_version(instance, COLLAB, "impressions", version, party="ad_network", partition=key, why="test: same content")
    assert not _staged(ctx).stale
    # New content on one of them: stale for the gate, while Dagster's resolver skips a dependency this wide.
    newer = dataclasses.replace(version, checksum="f" * 64)
    freshness.record_version(instance, COLLAB, "impressions", newer, party="ad_network", partition=extra[-1], why="test: new content")
    assert _staged(ctx).stale == ["ad_network.impressions"]
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = build_definitions(ctx["settings"]).resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None), instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    assert resolver.get_status(dg.AssetKey(naming.normalised_key(COLLAB, "impressions"))).value == "FRESH", \
        "Dagster's resolver does not look past 100 partitions (why the gate applies the rule itself)"
    # Put back: the recorded content is the warehouse's again.
    freshness.record_version(instance, COLLAB, "impressions", version, party="ad_network", partition=extra[-1], why="test: restored")
    for key in extra:
        instance.delete_dynamic_partition(name, key)
    assert not _staged(ctx).stale


def test_a_table_normalised_before_a_new_column_gets_it_and_keeps_its_rows(ctx: dict[str, Any]) -> None:
    """Upgrading: an incremental table built by a version without ``<column>__changed`` gets the column on the next
    upload (on_schema_change: append_new_columns), its earlier rows untouched (null there), the new rows counted."""
    from dcr_pipelines.store import stages

    _run(ctx)
    with psycopg.connect(ctx["url"], autocommit=True) as conn:
        conn.execute(f'alter table {TABLE} drop column "user_email__changed"')
    before = _rows(ctx["url"])
    _drop(ctx, "may.csv", impressions(30, 100))
    _run(ctx)
    after = _rows(ctx["url"])
    _consistent(after)
    (new_part,) = after["parts"] - before["parts"]
    assert all(after["xmin"][p] == before["xmin"][p] for p in before["parts"]), "earlier rows were rewritten"
    with psycopg.connect(ctx["url"]) as conn:
        flags = conn.execute(f'select _dcr_part, "user_email__changed" from {TABLE}').fetchall()
        counts = stages.staging_counts(conn, ctx["loaded"], only=["impressions"])["impressions"]
    assert {flag for part, flag in flags if part != new_part} == {None}
    assert [flag for part, flag in flags if part == new_part] == [True] * 30  # " V100@Example.com " was trimmed and lowercased
    assert counts["changed_user_email"] == 30
