"""A snapshot of every asset key, check, job, schedule and sensor of the demo collaborations: graph changes show up in review.

Regenerate after an intended change with: DCR_UPDATE_SNAPSHOTS=1 make test
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dcr_pipelines.definitions import build_definitions
from dcr_pipelines.lib.settings import PROJECT_ROOT, Settings

SNAPSHOT = Path(__file__).parent.parent / "snapshots" / "demo_graph.json"


def _demo_definitions():  # type: ignore[no-untyped-def]
    settings = Settings(PROJECT_ROOT / ".unused", PROJECT_ROOT / "policies", Path("/landing"), PROJECT_ROOT / "dbt_project", None)
    return build_definitions(settings)


def _graph() -> dict[str, object]:
    defs = _demo_definitions()
    graph = defs.resolve_asset_graph()
    return {
        "assets": {
            k.to_user_string(): sorted(d.to_user_string() for d in graph.get(k).parent_keys)
            for k in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
        },
        "checks": sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys),
        "jobs": sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")),
        "schedules": sorted(s.name for s in defs.schedules or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "groups": sorted({graph.get(k).group_name for k in graph.get_all_asset_keys()}),
    }


def test_the_demo_graph_matches_its_snapshot() -> None:
    current = _graph()
    if os.environ.get("DCR_UPDATE_SNAPSHOTS") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
        if os.environ.get("CI"):
            pytest.fail("snapshot was missing in CI")
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_asset_has_a_description_and_belongs_to_the_collaboration_group() -> None:
    graph = _demo_definitions().resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable:
            assert node.group_name == key.path[0], key
            assert node.description, key
