"""Shared fixtures: a real PostgreSQL (embedded by default, DCR_DATABASE_URL if set) and a deployment home."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcr_pipelines.lib.database import stop_embedded
from dcr_pipelines.lib.settings import PROJECT_ROOT

EXTERNAL_HOST, EXTERNAL_PORT = "127.0.0.1", 5432


def external_pg_available() -> bool:
    try:
        with socket.create_connection((EXTERNAL_HOST, EXTERNAL_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def dcr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A deployment home for the whole test session; its embedded server is stopped afterwards."""
    home = tmp_path_factory.mktemp("dcr_home")
    saved = dict(os.environ)
    os.environ["DCR_HOME"] = str(home)
    os.environ["DCR_LANDING"] = str(home / "landing")
    os.environ["DCR_POLICIES"] = str(PROJECT_ROOT / "policies")
    yield home
    stop_embedded(home)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def runtime(dcr_home: Path):  # type: ignore[no-untyped-def]
    from dcr_pipelines.lib.runtime import activate

    return activate()


@pytest.fixture()
def policies_copy(tmp_path: Path) -> Path:
    """A private copy of policies/ that a test may edit."""
    target = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", target)
    return target
