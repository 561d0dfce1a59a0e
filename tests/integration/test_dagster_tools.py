"""Dagster's own tools work on a deployment with nothing exported but what `.env` names: `dg list defs`, `dg launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dcr_pipelines.lib.runtime import record_in_dotenv

from .conftest import checkout_copy

pytestmark = pytest.mark.slow
DG = str(Path(sys.executable).with_name("dg"))


def _project(tmp_path: Path, home: Path) -> Path:
    """A checkout as a user has it after `make demo`: the project files and a `.env` naming the deployment."""
    return checkout_copy(tmp_path, f"DCR_HOME={home}\nDAGSTER_HOME={home / 'dagster_home'}\n")


def _bare_env() -> dict[str, str]:
    """The user's shell: none of what `dcr` exports (the external database URL, if any, is the user's own setting)."""
    dropped = {"DAGSTER_HOME", "DCR_HOME", "DCR_WAREHOUSE_URL", "DCR_DAGSTER_PG_URL", "DBT_PROFILES_DIR"}
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith(("DCR_PG_", "DCR_SECRET__"))}


def test_dg_list_defs_and_dg_launch_work_from_the_checkout_with_no_wrapper_and_no_warning(runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _project(tmp_path, runtime.settings.home)
    listed = subprocess.run([DG, "list", "defs"], cwd=root, env=_bare_env(), capture_output=True, text=True, timeout=600)
    assert listed.returncode == 0, listed.stderr[-3000:]
    for name in ("demo__all", "demo__releases", "demo__ad_hoc", "demo__budget_watch", "demo__landing_files"):
        assert name in listed.stdout, name
    assert "warning" not in (listed.stdout + listed.stderr).lower(), listed.stderr[-2000:]
    launched = subprocess.run([DG, "launch", "--assets", "demo/access/grants"], cwd=root, env=_bare_env(), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    # The run landed in this deployment's instance (the same database `dcr` uses), not in a temporary one.
    runs = dg.DagsterInstance.get().get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]), limit=5)
    assert any(dg.AssetKey(["demo", "access", "grants"]) in (r.asset_selection or set()) for r in runs)


def test_dcr_records_only_a_deployment_inside_the_checkout_in_dotenv(tmp_path: Path) -> None:
    import dataclasses

    from dcr_pipelines.lib.settings import Settings

    root = tmp_path / "checkout"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / ".env").write_text("MY_OWN=1\nDAGSTER_HOME=/old\n")
    inside = dataclasses.replace(Settings.from_env(), home=root / ".dcr")
    assert record_in_dotenv(inside, root) == root / ".env"
    assert (root / ".env").read_text() == f"MY_OWN=1\nDCR_HOME={root / '.dcr'}\nDAGSTER_HOME={root / '.dcr' / 'dagster_home'}\n"
    outside = dataclasses.replace(Settings.from_env(), home=tmp_path / "elsewhere")
    assert record_in_dotenv(outside, root) is None and "elsewhere" not in (root / ".env").read_text()
