"""A query's pre-noise model is a view over the request's parameters: a release with new parameters records them and
reads the view (no dbt, so a fresh `dcr release` costs about what a stored one does); a view built from another model
(a new policy, a new version of the code) is rebuilt by dbt first. Either way the release reads exactly its request."""

from __future__ import annotations

import dataclasses
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.defs import dbt_runner
from dcr_pipelines.lib import demo_data, naming
from dcr_pipelines.lib.dbt_codegen import model_digest
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import collaboration_keys, materialize, release_run_config

from .conftest import expected_campaign_reach, land, make_collaboration

C = "views"
QUERY = "campaign_reach"


@pytest.fixture(scope="module")
def views(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("policies")
    make_collaboration(root, C, groups=24, budget=1000.0)  # nothing capped: the view equals pandas on the plain files
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / C, rows=600, overlap=0.5, seed=33)
    land(files, settings.landing, C)
    defs = build_definitions(settings)
    outcome = materialize(defs, collaboration_keys(defs, C), instance=dg.DagsterInstance.get())
    assert outcome.success, outcome.failure
    return {"defs": defs, "files": files, "url": runtime.warehouse.url(), "loaded": load_collaboration(root / C)}


@pytest.fixture()
def dbt_builds(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The selections of every dbt build this test's runs start (the real dbt runs)."""
    calls: list[list[str]] = []
    real = dbt_runner.build

    def spy(project: Any, selection: list[str], **kwargs: Any) -> Any:
        calls.append(selection)
        return real(project, selection, **kwargs)

    monkeypatch.setattr(dbt_runner, "build", spy)
    return calls


def _release(views: dict[str, Any], since: str) -> dict[str, Any]:
    outcome = materialize(views["defs"], [naming.release_key(C, QUERY)], instance=dg.DagsterInstance.get(),
                          run_config=release_run_config(C, QUERY, {"since": since}))
    assert outcome.success, outcome.failure
    meta = outcome.metadata["/".join(naming.release_key(C, QUERY))]
    assert meta["cached"] is False and meta["params"] == {"since": since}
    return meta


def _read_as_released(views: dict[str, Any], since: str) -> None:
    """The view, read now, is the request's: its rows carry the request's key and equal pandas for its parameters."""
    with psycopg.connect(views["url"]) as conn:
        (key,) = conn.execute(f'select request_key from "{naming.analysis_schema(C)}".built_from where query_name = %s', (QUERY,)).fetchone()
        rows = conn.execute(f'select campaign_id, store_region, buyers, spend__sum, dcr_request from "{naming.analysis_schema(C)}".query_{QUERY}').fetchall()
    assert rows and {r[4] for r in rows} == {key}
    got = pd.DataFrame([r[:4] for r in rows], columns=["campaign_id", "store_region", "buyers", "spend"])
    want = expected_campaign_reach(views["files"], since)
    merged = want.merge(got, on=["campaign_id", "store_region"], suffixes=("_want", "_got"), how="outer").fillna(0)
    assert len(merged) == len(want) > 0
    assert (merged["buyers_want"] == merged["buyers_got"]).all()
    assert ((merged["spend_want"] - merged["spend_got"].astype(float)).abs() < 1e-6).all()


def test_a_request_with_new_parameters_runs_no_dbt_and_reads_exactly_its_parameters(views: dict[str, Any], dbt_builds: list[list[str]]) -> None:
    for since in ("2026-01-03", "2026-01-20"):
        meta = _release(views, since)
        assert meta["pre_noise_rebuilt_for_request"] is False
        _read_as_released(views, since)
    assert dbt_builds == [], "no dbt on a request the view's model already serves"
    with psycopg.connect(views["url"]) as conn:
        kind = conn.execute("select relkind from pg_class where oid = to_regclass(%s)", (f'"{naming.analysis_schema(C)}".query_{QUERY}',)).fetchone()
    assert kind == ("v",)


def test_a_view_built_from_another_model_is_rebuilt_by_dbt_before_the_release_reads_it(views: dict[str, Any], dbt_builds: list[list[str]]) -> None:
    """An upgrade or a policy change the pipeline has not built yet: the recorded model differs from the current one."""
    table = f'"{naming.analysis_schema(C)}".built_from'
    with psycopg.connect(views["url"]) as conn:
        conn.execute(f"update {table} set model_sha256 = 'an earlier model' where query_name = %s", (QUERY,))
    meta = _release(views, "2026-01-07")
    assert meta["pre_noise_rebuilt_for_request"] is True
    assert dbt_builds == [["--select", naming.query_model(C, QUERY)]]
    _read_as_released(views, "2026-01-07")
    with psycopg.connect(views["url"]) as conn:
        recorded = conn.execute(f"select model_sha256 from {table} where query_name = %s", (QUERY,)).fetchone()
    assert recorded == (model_digest(views["loaded"], views["loaded"].queries[QUERY]),)
    _release(views, "2026-01-08")
    assert len(dbt_builds) == 1, "the rebuilt view serves the next request as it is"


def test_a_function_in_a_builder_view_runs_as_the_pre_noise_reader_never_as_the_operator(views: dict[str, Any]) -> None:
    """A view runs the functions it calls as whoever reads it: the release reads pre-noise views as a NOLOGIN role
    with no power (the operator is a superuser on the embedded server), so a view the builder made cannot act as it."""
    from psycopg import sql

    from dcr_pipelines.store import analysis as store_analysis
    from dcr_pipelines.store.builder import login_name

    reader = store_analysis.pre_noise_reader(C)
    probe = sql.Identifier(naming.analysis_schema(C), "query_probe")
    with psycopg.connect(views["url"], autocommit=True) as conn:
        conn.execute(sql.SQL("set role {}").format(sql.Identifier(login_name(C))))
        conn.execute(sql.SQL("create view {} as select current_user::text as who, pg_has_role(current_user, 'pg_read_server_files', 'usage') as files").format(probe))
        conn.execute("reset role")
        try:
            assert store_analysis.read_pre_noise(conn, C, sql.SQL("select who, files from {}").format(probe)) == [(reader, False)]
            assert conn.execute("select current_user").fetchone() != (reader,), "the operator's role is back after the read"
            powers = conn.execute("select rolsuper or rolcreaterole or rolcreatedb or rolbypassrls or rolcanlogin from pg_roles where rolname = %s", (reader,)).fetchone()
            assert powers == (False,)
        finally:
            conn.execute(sql.SQL("drop view {}").format(probe))


def test_the_requests_view_the_builder_reads_cannot_be_written_through(views: dict[str, Any]) -> None:
    from dcr_pipelines.store import access

    with psycopg.connect(views["url"], autocommit=True) as conn:
        conn.execute(f'set role "{access.role_name(C, "analysis_builder")}"')  # the schema's grants give it all on the view
        with pytest.raises(psycopg.Error, match="cannot update view|not automatically updatable"):
            conn.execute(f"update \"{naming.analysis_schema(C)}\".requests set params = '{{}}'")
