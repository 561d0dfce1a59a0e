"""`dcr policy check` and `dcr policy hash` as a user runs them: a new process, exit codes, one error line per mistake."""

from __future__ import annotations

import os
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

def test_policy_render_writes_the_models_and_never_replaces_a_folder_of_other_files(tmp_path: Path) -> None:
    dcr = [sys.executable, "-m", "dcr_pipelines.cli", "policy", "render", "demo", "--out"]
    target = tmp_path / "render"
    for _ in range(2):  # an earlier render is replaced
        done = subprocess.run([*dcr, str(target)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (target / "analysis" / "qry_demo__campaign_reach.sql").read_text() == (
        PROJECT_ROOT / "dbt_project" / "golden" / "demo" / "analysis" / "qry_demo__campaign_reach.sql").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    for out in (other, tmp_path / "a_file"):
        refused = subprocess.run([*dcr, str(out)], capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.startswith("error: --out ") and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_policy_check_counts_agree_with_their_nouns() -> None:
    done = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "policy", "check", str(PROJECT_ROOT / "policies")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ok: demo_home (3 datasets, 1 query)\n" in done.stdout and "ok: demo (3 datasets, 3 queries)\n" in done.stdout, done.stdout


def test_policy_new_scaffolds_a_collaboration_that_passes_the_check_and_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    env = {**os.environ, "DCR_POLICIES": str(root), "DCR_HOME": str(tmp_path / "home")}

    def dcr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", *args], capture_output=True, text=True, env=env, timeout=300)

    made = dcr("policy", "new", "retail_media", "--parties", "retailer,publisher,bank")
    assert made.returncode == 0, made.stderr
    folder = root / "retail_media"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["collaboration.yaml", "protections/bank.json", "protections/publisher.json", "protections/retailer.json",
                     "queries/overview.sql", "queries/overview.yaml"]
    checked = dcr("policy", "check")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "ok: retail_media (3 datasets, 1 query)\n"
    loaded = load_collaboration(folder)
    assert list(loaded.collaboration.members) == ["retailer", "publisher", "bank"] and loaded.parties() == ("retailer", "publisher", "bank")
    # Every field written out carries a comment saying what it is (keys that only open a block, and the approval
    # entries under the commented `approvals:`, aside).
    for path in (folder / "collaboration.yaml", folder / "queries" / "overview.yaml"):
        bare = [line for line in path.read_text().splitlines()
                if line.strip() and not line.strip().startswith(("#", "- member:", "sha256:")) and not line.rstrip().endswith(":")
                and " #" not in line]
        assert bare == [], f"{path.name}: fields without a comment: {bare}"

    for args, message in (
        (("policy", "new", "retail_media"), f"error: {folder} already exists"),
        (("policy", "new", "Retail-Media"), "error: 'Retail-Media' is not a collaboration name"),
        (("policy", "new", "solo", "--parties", "retailer"), "error: --parties: a collaboration needs at least two parties"),
        (("policy", "new", "twice", "--parties", "a,a"), "error: --parties: a, a names a party twice"),
        (("policy", "new", "bad_party", "--parties", "retailer,Pub"), "error: --parties: 'Pub' is not a member name"),
    ):
        refused = dcr(*args)
        assert refused.returncode == 2 and refused.stderr.startswith(message) and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert sorted(p.name for p in root.iterdir()) == ["retail_media"], "a refused scaffold left something behind"
    assert load_collaboration(folder).policy_sha256 == loaded.policy_sha256, "the existing collaboration was changed"
