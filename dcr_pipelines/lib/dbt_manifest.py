"""Build the dbt manifest ahead of runs: regenerate models from policy, parse only when something changed."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from . import dbt_codegen
from .policy import LoadedCollaboration


class DbtParseError(RuntimeError):
    """dbt could not parse the generated project."""


def dbt_executable() -> Path:
    """The dbt installed beside this interpreter (the project's venv), whatever PATH says."""
    return Path(sys.executable).with_name("dbt")


def hand_written_digest(dbt_project: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([dbt_project / "dbt_project.yml", *(dbt_project / "macros").rglob("*.sql")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_manifest(dbt_project: Path, collaborations: Sequence[LoadedCollaboration]) -> Path:
    """Path of a manifest.json that matches the current policies; runs ``dbt parse`` only if stale.

    Every process that loads the definitions comes here; an exclusive file lock
    keeps two of them from rewriting the models or the manifest at once.
    """
    target = dbt_project / "target"
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".dcr_prepare.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _prepare(dbt_project, collaborations)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(dbt_project: Path, collaborations: Sequence[LoadedCollaboration]) -> Path:
    generated = dbt_codegen.write_models(dbt_project, collaborations)
    stamp_value = hashlib.sha256((generated + hand_written_digest(dbt_project)).encode()).hexdigest()
    target = dbt_project / "target"
    manifest = target / "manifest.json"
    stamp = target / "dcr_manifest.sha256"
    if manifest.is_file() and stamp.is_file() and stamp.read_text().strip() == stamp_value:
        return manifest
    dbt = dbt_executable()
    env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    for name in ("DCR_PG_HOST", "DCR_PG_USER", "DCR_PG_DBNAME"):
        env.setdefault(name, "unused-at-parse")
    proc = subprocess.run(
        [str(dbt), "parse", "--no-partial-parse", "--project-dir", str(dbt_project), "--profiles-dir", str(dbt_project), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise DbtParseError(f"dbt parse failed:\n{proc.stdout}\n{proc.stderr}")
    stamp.write_text(stamp_value)
    return manifest
