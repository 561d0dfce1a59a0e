"""Shared fixtures: a real PostgreSQL (embedded by default, DCR_DATABASE_URL if set) and a deployment home."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcr_pipelines.lib.settings import PROJECT_ROOT

EXTERNAL_HOST, EXTERNAL_PORT = "127.0.0.1", 5432


def external_pg_available() -> bool:
    try:
        with socket.create_connection((EXTERNAL_HOST, EXTERNAL_PORT), timeout=1):
            return True
    except OSError:
        return False


def _stop_embedded(home: Path) -> None:
    pid_file = home / "pg" / "postmaster.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text().splitlines()[0])
        try:
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        except ProcessLookupError:
            return
        for _ in range(100):
            if not pid_file.exists():
                break
            time.sleep(0.05)


@pytest.fixture(scope="session")
def dcr_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A deployment home for the whole test session; its embedded server is stopped afterwards."""
    home = tmp_path_factory.mktemp("dcr_home")
    saved = dict(os.environ)
    os.environ["DCR_HOME"] = str(home)
    os.environ["DCR_LANDING"] = str(home / "landing")
    os.environ["DCR_POLICIES"] = str(PROJECT_ROOT / "policies")
    yield home
    _stop_embedded(home)
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
