"""`dcr policy check` and `dcr policy hash` as a user runs them: a new process, exit codes, one error line per mistake."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.settings import PROJECT_ROOT

COLLAB = "collaboration.yaml"


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    target = tmp_path / "policies" / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", target)
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_policy_check_command_exits_non_zero_on_any_error(demo: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "policy", "check", str(demo.parent)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok: demo" in ok.stdout
    _edit(demo / COLLAB, "  padding: false", "  padding: maybe")
    bad = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "policy", "check", str(demo.parent)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "error: " in bad.stderr and "collaboration.yaml:" in bad.stderr and "matching.padding" in bad.stderr


def test_policy_hash_and_the_loader_share_one_function_even_with_a_sql_field(demo: Path, tmp_path: Path) -> None:
    queries = demo / "queries"
    (queries / "campaign_reach.sql").rename(queries / "reach_v2.sql")
    spec = queries / "campaign_reach.yaml"
    spec.write_text("sql: reach_v2.sql\n" + spec.read_text())
    approve_all(demo)
    loaded = load_collaboration(demo)
    printed = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "policy", "hash", "demo"], capture_output=True, text=True,
                             env={"DCR_POLICIES": str(demo.parent), "PATH": "/usr/bin:/bin", "DCR_HOME": str(tmp_path / "home")})
    assert printed.returncode == 0, printed.stderr
    assert f"campaign_reach  {loaded.queries['campaign_reach'].sha256}" in printed.stdout