"""The executor is the deployment's choice (DCR_EXECUTOR), with in-process as the measured default."""

from __future__ import annotations

import dagster as dg
import pytest

from dcr_pipelines.definitions import _executor


def test_in_process_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DCR_EXECUTOR", raising=False)
    assert _executor() is dg.in_process_executor


def test_multiprocess_leaves_dagsters_default_and_celery_uses_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCR_EXECUTOR", "multiprocess")
    assert _executor() is None
    monkeypatch.setenv("DCR_EXECUTOR", "celery")
    monkeypatch.setenv("DCR_CELERY_BROKER", "redis://queue.example:6379/3")
    executor = _executor()
    assert executor is not None and executor.name == "celery"


def test_an_unknown_executor_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCR_EXECUTOR", "kubernetess")
    with pytest.raises(ValueError, match="DCR_EXECUTOR='kubernetess'"):
        _executor()
