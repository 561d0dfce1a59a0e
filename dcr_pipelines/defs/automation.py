"""What runs without being asked: the pipeline selection, the policy's schedules, the policy sensor."""

from collections.abc import Iterator

import dagster as dg

from ..lib import naming
from ..lib.policy import LoadedCollaboration, PolicyError, load_collaboration


def pipeline_selection(collab: str) -> dg.AssetSelection:
    """A collaboration's pipeline up to the pre-noise tables: all of its group but releases and ad-hoc queries,
    which spend budget or hand out results and so run only when someone asks."""
    return dg.AssetSelection.groups(collab) - dg.AssetSelection.tag("dcr/stage", "results") - dg.AssetSelection.tag("dcr/stage", "ad_hoc")


def scheduled_releases(loaded: LoadedCollaboration) -> dg.AssetSelection:
    """The releases whose query opts into schedules (`release: scheduled`)."""
    keys = [dg.AssetKey(naming.release_key(loaded.name, q)) for q, query in loaded.queries.items() if query.spec.release == "scheduled"]
    return dg.AssetSelection.assets(*keys) if keys else dg.AssetSelection.assets()


def _schedules(loaded: LoadedCollaboration) -> list[dg.ScheduleDefinition]:
    """The schedules the policy declares (created stopped; turn them on in the UI)."""
    c = loaded.name
    stages = {"matching": ("private", "staging", "matching"), "queries": ("analysis", "results")}
    out = []
    for schedule in loaded.collaboration.schedules:
        selection = pipeline_selection(c)
        if schedule.target != "all":
            selection = pipeline_selection(c) & dg.AssetSelection.tag("dcr/stage", stages[schedule.target][0])
            for stage in stages[schedule.target][1:]:
                selection = selection | (pipeline_selection(c) & dg.AssetSelection.tag("dcr/stage", stage))
        if schedule.target != "matching":
            selection = selection | scheduled_releases(loaded)  # default parameters; only queries that opt in
        out.append(
            dg.ScheduleDefinition(
                name=f"{c}__{schedule.name}",
                cron_schedule=schedule.cron,
                target=selection,
                description=f"Declared in policies/{c}/collaboration.yaml: {schedule.target} at '{schedule.cron}'.",
            )
        )
    return out


def _policy_sensor(loaded: LoadedCollaboration) -> dg.SensorDefinition:
    """Watches the collaboration's policy folder: reports a change or a mistake, re-applies grants after a reload."""
    c = loaded.name
    folder = loaded.folder

    @dg.sensor(
        name=f"{c}__policy_changes",
        asset_selection=[dg.AssetKey(naming.grants_key(c))],
        minimum_interval_seconds=60,
        description=f"Watches {folder}: a changed policy is reported until the code location is reloaded; "
        "after a reload, grants are re-applied from the new policy; a broken policy is reported with file and line.",
    )
    def policy_sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        try:
            on_disk = load_collaboration(folder).policy_sha256
        except PolicyError as exc:
            yield dg.SkipReason(f"policy of {c} on disk has {len(exc.issues)} mistake(s); running with the last good one: " + "; ".join(map(str, exc.issues[:5])))
            return
        if on_disk != loaded.policy_sha256:
            yield dg.SkipReason(f"policy of {c} changed on disk ({on_disk[:12]}); reload the code location to use it")
            return
        if context.cursor == loaded.policy_sha256:
            yield dg.SkipReason("policy unchanged")
            return
        context.update_cursor(loaded.policy_sha256)
        yield dg.RunRequest(run_key=f"policy:{loaded.policy_sha256}", tags={"dcr/collaboration": c, "dcr/policy": loaded.policy_sha256[:12]})

    return policy_sensor
