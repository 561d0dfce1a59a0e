"""The dbt models the demo policies generate, committed under dbt_project/golden/: a policy or generator change shows its SQL in review.

Regenerate after an intended change with: DCR_UPDATE_SNAPSHOTS=1 make test-fast
(or `dcr policy render demo --out dbt_project/golden/demo`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

GOLDEN = PROJECT_ROOT / "dbt_project" / "golden"
COLLABS = ["demo", "demo_home"]


def _on_disk(folder: Path) -> dict[Path, str]:
    return {p.relative_to(folder): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("collab", COLLABS)
def test_generated_models_match_the_reviewed_golden_copy(collab: str) -> None:
    rendered = dbt_codegen.render(load_collaboration(PROJECT_ROOT / "policies" / collab))
    folder = GOLDEN / collab
    if os.environ.get("DCR_UPDATE_SNAPSHOTS"):
        shutil.rmtree(folder, ignore_errors=True)
        dbt_codegen.write_rendered(folder, rendered)
    golden = _on_disk(folder)
    assert sorted(golden) == sorted(rendered), f"models added or removed; regenerate {folder} (see this file's docstring)"
    for rel, content in rendered.items():
        assert golden[rel] == content, f"{folder / rel} differs from what the policy generates; regenerate it and review the diff"


def test_a_policy_change_changes_the_golden_sql(tmp_path: Path) -> None:
    """The comparison is not vacuous: editing the policy changes the rendered SQL that the golden copy pins."""
    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "queries" / "campaign_reach.yaml"
    path.write_text(path.read_text().replace("max_groups_per_unit: 3", "max_groups_per_unit: 2"))
    from dcr_pipelines.lib.policy.approve import approve_all

    approve_all(folder)
    changed = dbt_codegen.render(load_collaboration(folder))
    golden = _on_disk(GOLDEN / "demo")
    differing = [rel for rel, content in changed.items() if golden.get(rel) != content]
    assert Path("analysis/qry_demo__campaign_reach.sql") in differing
