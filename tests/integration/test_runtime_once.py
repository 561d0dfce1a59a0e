"""Settings are read, the database reached and the environment exported once per process: Dagster's storage classes
take the runtime the process already activated (lib/runtime.current) instead of activating again."""

from __future__ import annotations

import os

import dagster as dg

from dcr_pipelines.defs.storage import DeploymentEventLogStorage
from dcr_pipelines.lib import runtime as runtime_module


def test_storage_reuses_the_activated_runtime_and_leaves_the_environment_alone(runtime) -> None:  # type: ignore[no-untyped-def]
    active = runtime_module.activate()
    saved = os.environ["DCR_PG_HOST"]
    os.environ["DCR_PG_HOST"] = "set-by-this-test"  # activate() would write it back; current() must not
    try:
        assert runtime_module.current() is active
        storage = DeploymentEventLogStorage.from_config_value(None, {})
        assert os.environ["DCR_PG_HOST"] == "set-by-this-test"
        assert active.dagster_url.split("?")[0].split("/")[-1] in storage.postgres_url  # the deployment's Dagster database
        assert isinstance(dg.DagsterInstance.get(), dg.DagsterInstance)
    finally:
        os.environ["DCR_PG_HOST"] = saved


def test_another_environment_is_activated_afresh(runtime, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    active = runtime_module.activate()
    monkeypatch.setenv("DCR_DAGSTER_DATABASE_URL", active.dagster_url)  # a setting that changed since: read again
    again = runtime_module.current()
    assert again is not active and again.dagster_url == active.dagster_url
    assert runtime_module.current() is again
