"""What runs without being asked: the collaboration's jobs, the policy's schedules, and its sensors (policy
changes, a home party's PSI answer, a low privacy budget)."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import home_psi, naming
from ..lib.naming import job_names, uploads_job_name
from ..lib.policy import LoadedCollaboration, PolicyError, load_collaboration
from ..store import ledger
from .common import BUDGET_LOW_TAG, PSI_FOLDER, concerns, landing_folder
from .resources import WarehouseResource


def appended_raw_keys(loaded: LoadedCollaboration) -> list[dg.AssetKey]:
    """The raw assets of append-mode datasets: partitioned by upload, each in a job of its own."""
    return [dg.AssetKey(naming.raw_key(loaded.name, name)) for name, ds in loaded.collaboration.datasets.items() if ds.mode == "append"]


def pipeline_selection(collab: str, appended: list[dg.AssetKey] | None = None) -> dg.AssetSelection:
    """A collaboration's pipeline up to the pre-noise views: all of its group but releases and ad-hoc queries,
    which spend budget or hand out results and so run only when someone asks, and appended uploads (one run per file)."""
    selection = dg.AssetSelection.groups(collab) - dg.AssetSelection.tag("dcr/stage", "results") - dg.AssetSelection.tag("dcr/stage", "ad_hoc")
    return selection - dg.AssetSelection.assets(*appended) if appended else selection


def collaboration_jobs(loaded: LoadedCollaboration) -> list[Any]:
    """The pipeline job, the releases job (one release per run, on request), the ad-hoc job, one job per append-mode dataset."""
    c, names = loaded.name, job_names(loaded.name)
    appended = appended_raw_keys(loaded)
    jobs = [
        dg.define_asset_job(names["pipeline"], selection=pipeline_selection(c, appended),
                            description=f"{c} up to the pre-noise views: ingest, staging, matching, analyses. Releases nothing, charges nothing.",
                            tags={"dcr/collaboration": c}),
        dg.define_asset_job(names["releases"], selection=dg.AssetSelection.groups(c) & dg.AssetSelection.tag("dcr/stage", "results"),
                            description=f"Releases of {c}'s approved queries, on request (launch one with its parameters as config): "
                            "budget is charged here. A refused release records why and is not a failed run.",
                            tags={"dcr/collaboration": c}),
        dg.define_asset_job(names["ad_hoc"], selection=dg.AssetSelection.assets(dg.AssetKey(naming.ad_hoc_key(c))),
                            description=f"Ad-hoc SQL of a member of {c} (`dcr query run`). A refused query records the rule and is not a failed run.",
                            tags={"dcr/collaboration": c}),
    ]
    for key, (name, ds) in zip(appended, [(n, d) for n, d in loaded.collaboration.datasets.items() if d.mode == "append"], strict=True):
        jobs.append(dg.define_asset_job(uploads_job_name(c, ds.owner, name), selection=dg.AssetSelection.assets(key),
                                        description=f"One appended upload of {ds.owner}'s {name} per run (a partition per file).",
                                        tags={"dcr/collaboration": c}))
    return jobs


def scheduled_releases(loaded: LoadedCollaboration) -> dg.AssetSelection:
    """The releases whose query opts into schedules (`release: scheduled`)."""
    keys = [dg.AssetKey(naming.release_key(loaded.name, q)) for q, query in loaded.queries.items() if query.spec.release == "scheduled"]
    return dg.AssetSelection.assets(*keys) if keys else dg.AssetSelection.assets()


def _schedules(loaded: LoadedCollaboration) -> list[dg.ScheduleDefinition]:
    """The schedules the policy declares (created stopped; turn them on in the UI), each with a job of its own."""
    c = loaded.name
    stages = {"matching": ("private", "staging", "matching"), "queries": ("analysis", "results")}
    pipeline = pipeline_selection(c, appended_raw_keys(loaded))
    out = []
    for schedule in loaded.collaboration.schedules:
        selection = pipeline
        if schedule.target != "all":
            selection = pipeline & dg.AssetSelection.tag("dcr/stage", stages[schedule.target][0])
            for stage in stages[schedule.target][1:]:
                selection = selection | (pipeline & dg.AssetSelection.tag("dcr/stage", stage))
        if schedule.target != "matching":
            selection = selection | scheduled_releases(loaded)  # default parameters; only queries that opt in
        where = f"policies/{c}/collaboration.yaml"
        job = dg.define_asset_job(f"{c}__{schedule.name}_job", selection=selection, tags={"dcr/collaboration": c, "dcr/schedule": schedule.name},
                                  description=f"What schedule {schedule.name} of {where} runs: {schedule.target}.")
        # The schedule is the request of the releases that opt into it (default parameters): it says so, as a user would.
        requests = {"__".join(naming.release_key(c, q)): {"config": {"requested_by": f"schedule {c}__{schedule.name}"}}
                    for q, query in loaded.queries.items() if query.spec.release == "scheduled" and schedule.target != "matching"}
        out.append(
            dg.ScheduleDefinition(
                name=f"{c}__{schedule.name}",
                cron_schedule=schedule.cron,
                job=job,
                run_config={"ops": requests} if requests else None,
                description=f"Declared in {where}: {schedule.target} at '{schedule.cron}'.",
            )
        )
    return out


def _policy_sensor(loaded: LoadedCollaboration) -> dg.SensorDefinition:
    """Watches the collaboration's policy folder: reports a change or a mistake, re-applies grants after a reload."""
    c = loaded.name
    folder = loaded.folder

    @dg.sensor(
        name=f"{c}__policy_changes",
        job_name=job_names(c)["pipeline"],
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
        yield dg.RunRequest(run_key=f"policy:{loaded.policy_sha256}", asset_selection=[dg.AssetKey(naming.grants_key(c))],
                            tags={"dcr/collaboration": c, "dcr/policy": loaded.policy_sha256[:12]})

    return policy_sensor


def _psi_answer_sensor(loaded: LoadedCollaboration, landing: Path) -> dg.SensorDefinition:
    """A home party's PSI messages arrive as files: each new one launches the pipeline, which completes the match.

    Waiting for a party is an expected state (the matching step records it as an observation, the run stays green);
    this sensor is what ends the wait.
    """
    c = loaded.name
    folders = {party: landing_folder(landing, c, party, PSI_FOLDER) for party in loaded.collaboration.matching.home_parties}

    @dg.sensor(
        name=f"{c}__psi_answers",
        job_name=job_names(c)["pipeline"],
        minimum_interval_seconds=30,
        description=f"Launches {c}'s pipeline when a party that keeps its identifiers at home puts a PSI setup or answer "
        f"file (*{home_psi.SUFFIX}) into " + ", ".join(str(f) for f in folders.values()) + ".",
    )
    def psi_answers(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        found = []
        for party, folder in folders.items():
            for path in sorted(folder.glob(f"*{home_psi.SUFFIX}")) if folder.is_dir() else []:
                found.append((party, path, path.stat().st_mtime_ns))
        if not found:
            yield dg.SkipReason("no PSI message from a home party yet")
            return
        for party, path, mtime in found:  # run keys make each file launch one run, once
            yield dg.RunRequest(run_key=f"{path.name}:{mtime}", tags={"dcr/collaboration": c, "dcr/psi_message": path.name, "dcr/party": party})

    return psi_answers


def _budget_sensor(loaded: LoadedCollaboration) -> dg.SensorDefinition:
    """Warns when a consumer's remaining epsilon falls under the policy's ``warn_below`` (default: a fifth of the budget):
    a warning in the sensor's log and tick (Automation in the UI), an observation on each of the consumer's results
    assets (their asset pages), and a tag on the consumer's latest release run. Launches nothing."""
    c = loaded.name
    budgets = {b.consumer: b for b in loaded.collaboration.budgets}
    by_consumer = {consumer: [q for q, query in loaded.queries.items() if query.spec.rule == "dp" and query.spec.consumer == consumer]
                   for consumer in budgets}

    @dg.sensor(
        name=f"{c}__budget_watch",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Warns when a consumer of {c} has less privacy budget left than its warn_below (collaboration.yaml: budgets).",
    )
    def budget_watch(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult | dg.SkipReason:
        warned: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
        low: dict[str, str] = {}
        newly: list[str] = []
        with warehouse.connect() as conn:
            for consumer, budget in budgets.items():
                status = ledger.budget_status(conn, naming.results_schema(c), budget)
                if status.remaining < budget.warning_level:
                    low[consumer] = (f"{consumer} has epsilon {status.remaining:.3g} of {status.total:.3g} left, "
                                     f"under warn_below {budget.warning_level:.3g}")
                    if warned.get(consumer) != round(status.spent, 9):
                        warned[consumer] = round(status.spent, 9)
                        newly.append(consumer)
                        context.log.warning(f"privacy budget low: {low[consumer]}")
                        _tag_latest_release_run(context.instance, c, by_consumer.get(consumer, []), low[consumer])
                else:
                    warned.pop(consumer, None)
        if not low:
            return dg.SkipReason("every consumer has more budget left than its warn_below")
        events = [dg.AssetObservation(asset_key=naming.release_key(c, q), description=f"privacy budget low: {message}",
                                      metadata={"budget_warning": message, "consumer": consumer,
                                                **concerns(loaded, loaded.queries[q].datasets, [*loaded.queries[q].spec.receivers, consumer])})
                  for consumer, message in low.items() if consumer in newly for q in by_consumer.get(consumer, [])]
        return dg.SensorResult(skip_reason="privacy budget low: " + "; ".join(low.values()), asset_events=events, cursor=json.dumps(warned))

    return budget_watch


def _tag_latest_release_run(instance: dg.DagsterInstance, collab: str, queries: list[str], message: str) -> None:
    keys = {dg.AssetKey(naming.release_key(collab, q)) for q in queries}
    for run in instance.get_runs(dg.RunsFilter(tags={"dcr/collaboration": collab}, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=100):
        if run.asset_selection and run.asset_selection & keys:
            instance.add_run_tags(run.run_id, {BUDGET_LOW_TAG: message})
            return
