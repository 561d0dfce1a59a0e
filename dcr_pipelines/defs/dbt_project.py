"""The deployment's dbt project: the checkout's hand-written macros plus the models the policies generate, in a folder of
the deployment (``$DCR_HOME/dbt``), prepared through dagster-dbt's ``DbtProject`` and a preparer of ours.

The checkout is never written to: two deployments (two ``DCR_HOME``) with different policies can share one checkout.
Every process that loads the definitions prepares the project; a file lock keeps two of them from writing at once, and
``dbt parse`` runs only when the models or macros changed.
"""

from __future__ import annotations

import fcntl
import filecmp
import hashlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtProject
from dagster_dbt.dbt_project import DbtProjectPreparer

from ..lib import dbt_codegen
from ..lib.policy import LoadedCollaboration
from . import dbt_runner

HAND_WRITTEN = ("dbt_project.yml", "profiles.yml")
MACROS = "macros"
STAMP = dbt_runner.STAMP


class DbtParseError(RuntimeError):
    """dbt could not parse the generated project."""


def hand_written_digest(project_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted([project_dir / "dbt_project.yml", *(project_dir / MACROS).rglob("*.sql")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _sync_hand_written(source: Path, target: Path) -> None:
    """Copy the checkout's dbt_project.yml, profiles.yml and macros/ into the deployment folder (only what changed)."""
    target.mkdir(parents=True, exist_ok=True)
    wanted = {Path(name) for name in HAND_WRITTEN} | {p.relative_to(source) for p in (source / MACROS).rglob("*") if p.is_file()}
    for rel in sorted(wanted):
        src, dst = source / rel, target / rel
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    for stale in [p for p in (target / MACROS).rglob("*") if p.is_file() and p.relative_to(target) not in wanted]:
        stale.unlink()


class PolicyModelsPreparer(DbtProjectPreparer):
    """Writes the policies' models into the project and parses it; always, not only under `dg dev`: the models follow
    the policy folders, which change without a code change."""

    def __init__(self, collaborations: Sequence[LoadedCollaboration]):
        self.collaborations = list(collaborations)

    def prepare_if_dev(self, project: DbtProject) -> None:
        self.prepare(project)

    def prepare(self, project: DbtProject) -> None:
        generated = dbt_codegen.write_models(project.project_dir, self.collaborations)
        stamp_value = hashlib.sha256((generated + hand_written_digest(project.project_dir)).encode()).hexdigest()
        stamp = project.project_dir / project.target_path / STAMP
        if project.manifest_path.is_file() and stamp.is_file() and stamp.read_text().strip() == stamp_value:
            return
        try:
            manifest = dbt_runner.parse(Path(project.project_dir), write_json=True)
        except dbt_runner.DbtRunError as exc:
            raise DbtParseError(str(exc)) from None
        stamp.write_text(stamp_value)
        dbt_runner.remember(Path(project.project_dir), stamp_value, manifest)


def project_dir(dbt_root: Path, policies: Path) -> Path:
    """The deployment's dbt project for one policies folder: a deployment pointed at another folder (an operator's
    trial, a test) gets a project of its own instead of overwriting the models a running process reads."""
    return dbt_root / ("policies-" + hashlib.sha256(str(policies.resolve()).encode()).hexdigest()[:12])


def prepare_project(source: Path, deployment: Path, collaborations: Sequence[LoadedCollaboration]) -> DbtProject:
    """The deployment's dbt project, with models for ``collaborations`` and a manifest that matches them."""
    deployment.mkdir(parents=True, exist_ok=True)
    with (deployment / dbt_runner.PREPARE_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _sync_hand_written(source, deployment)
            project = DbtProject(project_dir=deployment, profiles_dir=deployment)
            PolicyModelsPreparer(collaborations).prepare(project)
            return project
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class CollaborationTranslator(DagsterDbtTranslator):
    """Keys, groups and owners of generated models come from their ``meta.dcr`` block."""

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: Any) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        props = manifest.get("nodes", {}).get(unique_id) or manifest.get("sources", {}).get(unique_id) or {}
        meta = props.get("meta", {}).get("dcr") or props.get("config", {}).get("meta", {}).get("dcr")
        if not meta:
            return spec
        key = dg.AssetKey(meta["asset_key"])
        collab = key.path[0]
        tags = {"dcr/stage": meta.get("stage") or "source"}
        if meta.get("owner"):
            tags["dcr/party"] = meta["owner"]
        owners = [f"team:{meta['owner']}"] if meta.get("owner") else ["team:operator"]
        return spec.replace_attributes(key=key, group_name=collab, tags={**spec.tags, **tags}, owners=owners)
