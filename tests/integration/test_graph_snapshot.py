"""A snapshot of every asset key, check, job, schedule and sensor of the demo collaborations: graph changes show up in review.

Regenerate after an intended change with: DCR_UPDATE_SNAPSHOTS=1 make test
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from dcr_pipelines.definitions import build_definitions
from dcr_pipelines.lib.settings import PROJECT_ROOT, Settings

SNAPSHOT = Path(__file__).parent.parent / "snapshots" / "demo_graph.json"


def private_dbt_project(tmp: Path) -> Path:
    """A deployment dbt folder of its own: building definitions for another policies root here leaves the session
    deployment's generated models (which other tests' runs read) alone."""
    return tmp / "dbt"


def _definitions(policies: Path, dbt_project: Path):  # type: ignore[no-untyped-def]
    return build_definitions(Settings(PROJECT_ROOT / ".unused", policies, Path("/landing"), dbt_project, None))


@pytest.fixture(scope="module")
def demo_defs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _definitions(PROJECT_ROOT / "policies", private_dbt_project(tmp_path_factory.mktemp("graph")))


def _graph(defs) -> dict[str, object]:  # type: ignore[no-untyped-def]
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


def test_the_demo_graph_matches_its_snapshot(demo_defs) -> None:  # type: ignore[no-untyped-def]
    current = _graph(demo_defs)
    if os.environ.get("DCR_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    elif not SNAPSHOT.exists():  # a missing snapshot is a failure everywhere (CI included), not a silent first write
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
        pytest.fail(f"{SNAPSHOT} was missing: written now from the current graph; review it and commit it")
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_asset_has_a_description_and_belongs_to_the_collaboration_group(demo_defs) -> None:  # type: ignore[no-untyped-def]
    graph = demo_defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_materializable:
            assert node.group_name == key.path[0], key
            assert node.description, key


def test_the_demo_labels_differ_within_the_16_characters_the_lineage_graph_shows(demo_defs) -> None:  # type: ignore[no-untyped-def]
    graph = demo_defs.resolve_asset_graph()
    labels: dict[str, list[str]] = {}
    for key in graph.get_all_asset_keys():
        labels.setdefault(key.path[0], []).append(key.path[-1])
    assert set(labels) == {"demo", "demo_home"}
    for collab, names in labels.items():
        assert len({n[:16] for n in names}) == len(names), (collab, sorted(names))


def test_a_broken_collaboration_is_reported_and_the_others_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy mistake (here a bad cron) and a collaboration whose assets cannot be built each get a sensor saying why; demo loads."""
    from dcr_pipelines import definitions

    root = tmp_path / "policies"
    for name in ("demo", "demo_home"):
        shutil.copytree(PROJECT_ROOT / "policies" / name, root / name)
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", root / "cron_typo")
    collab = root / "cron_typo" / "collaboration.yaml"
    collab.write_text(collab.read_text().replace("name: demo\n", "name: cron_typo\n").replace('cron: "0 3', 'cron: "99 3', 1))
    real = definitions.build_collaboration

    def failing_for_demo_home(loaded, *args):  # type: ignore[no-untyped-def]
        if loaded.name == "demo_home":
            raise RuntimeError("simulated defect in one collaboration's assets")
        return real(loaded, *args)

    monkeypatch.setattr(definitions, "build_collaboration", failing_for_demo_home)
    defs = _definitions(root, private_dbt_project(tmp_path))
    groups = {defs.resolve_asset_graph().get(k).group_name for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert groups == {"demo"}
    sensors = {s.name: s for s in defs.sensors or []}
    assert "cron_typo__policy_broken" in sensors and "demo_home__policy_broken" in sensors
    assert "collaboration.yaml:" in (sensors["cron_typo__policy_broken"].description or "")
    assert "simulated defect" in (sensors["demo_home__policy_broken"].description or "")
    assert "demo__landing_files" in sensors


def test_each_kind_of_run_goes_through_its_collaboration_job(demo_defs) -> None:  # type: ignore[no-untyped-def]
    from dcr_pipelines.lib import naming
    from dcr_pipelines.runner import collaboration_keys, job_for, release_keys

    assert job_for(demo_defs, collaboration_keys(demo_defs, "demo")).name == "demo__all"
    assert job_for(demo_defs, release_keys(demo_defs, "demo")).name == "demo__releases"
    assert job_for(demo_defs, [naming.release_key("demo", "tier_reach")]).name == "demo__releases"
    assert job_for(demo_defs, [naming.ad_hoc_key("demo")]).name == "demo__ad_hoc"
    assert job_for(demo_defs, [naming.raw_key("demo", "impressions")]).name == "demo__ad_network__impressions__uploads"
    assert job_for(demo_defs, [naming.raw_key("demo", "customers")]).name == "demo__all"
    # A selection no single job holds (a test's mix of stages and releases) falls back to Dagster's implicit job.
    assert job_for(demo_defs, [naming.grants_key("demo"), naming.release_key("demo", "tier_reach")]).name.startswith("__ASSET_JOB")


def test_every_sensor_and_schedule_targets_a_named_job(demo_defs) -> None:  # type: ignore[no-untyped-def]
    names = {j.name for j in demo_defs.jobs}
    for sensor in demo_defs.sensors:
        if sensor.name.endswith("__budget_watch") or sensor.name.endswith("__policy_broken"):
            continue  # they launch nothing
        targets = {t.job_name for t in sensor.targets}
        assert targets and targets <= names, sensor.name
    for schedule in demo_defs.schedules or []:
        assert schedule.job_name in names or schedule.job_name.endswith("_job"), schedule.name


def test_every_asset_has_a_label_of_its_own_within_its_collaboration(demo_defs) -> None:  # type: ignore[no-untyped-def]
    # The UI labels a node with the key's last part: raw, staging and results of one dataset or query must differ there.
    by_collab: dict[str, list[str]] = {}
    for key in demo_defs.resolve_asset_graph().get_all_asset_keys():
        by_collab.setdefault(key.path[0], []).append(key.path[-1])
    for collab, labels in by_collab.items():
        assert len(labels) == len(set(labels)), (collab, sorted(label for label in labels if labels.count(label) > 1))


def test_a_schedule_requests_the_releases_that_opt_into_it_and_says_so(tmp_path: Path) -> None:
    """A release runs from a schedule only when its query opts in, and the schedule is the request: its run config
    names it as who asks (a release without a requester is refused)."""
    from dcr_pipelines.lib.policy.approve import approve_all

    root = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", root / "demo")
    spec = root / "demo" / "queries" / "region_spend.yaml"
    spec.write_text(spec.read_text() + "release: scheduled\n")
    approve_all(root / "demo")
    defs = _definitions(root, private_dbt_project(tmp_path))
    schedule = next(s for s in defs.schedules or [] if s.name == "demo__nightly_refresh")
    with dg.build_schedule_context() as context:
        (request,) = schedule.evaluate_tick(context).run_requests or []
    ops = request.run_config["ops"]
    assert ops == {"demo__results__region_spend": {"config": {"requested_by": "schedule demo__nightly_refresh"}}}
