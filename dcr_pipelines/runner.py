"""Run parts of a collaboration through Dagster, in-process, recorded in the deployment's instance.

The ``dcr`` command and the tests go through here, so every state change is
a Dagster run with lineage and metadata, visible in the UI.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from .lib import naming


@dataclass(frozen=True)
class RunOutcome:
    """What a request came to. ``success``: everything asked for was done. A refusal (a rule, the budget) or a wait for
    a party is an expected outcome: the Dagster run succeeded (``run_success``), ``failure`` says why nothing came of it."""

    success: bool
    run_id: str
    failure: str | None
    metadata: dict[str, dict[str, Any]]
    run_success: bool = True
    refused: bool = False
    waiting: bool = False
    job_name: str = ""


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_failure_data:
            err = event.step_failure_data.user_failure_data
            if err is not None and err.description:
                return err.description
            error = event.step_failure_data.error
            while error is not None and error.cause is not None and "DagsterExecutionStepExecutionError" in (error.cls_name or ""):
                error = error.cause  # the user code's own exception, not Dagster's wrapper
            if error is not None:
                return error.message.strip().splitlines()[-1]
    return "the run failed (see the Dagster UI for the event log)"


class _FilteredStream:
    """A stream that drops Dagster's own complaints about writing to a storage that has gone away (it writes them to
    stderr directly): the command reports that once, in one line."""

    NOISE = ("Exception while writing logger call to event log",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith(self.NOISE):
            return len(text)
        return int(self._stream.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _without_storage_noise() -> Iterator[None]:
    saved = sys.stderr
    sys.stderr = _FilteredStream(saved)
    try:
        yield
    finally:
        sys.stderr = saved


def op_name(key: Sequence[str]) -> str:
    return "__".join(key)


def materialize(
    defs: dg.Definitions,
    selection: Sequence[Sequence[str]],
    *,
    instance: dg.DagsterInstance | None = None,
    run_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    log_level: str = "CRITICAL",
    stdout_log: Path | None = None,
    partition_key: str | None = None,
) -> RunOutcome:
    """Materialize the asset keys in ``selection`` (and their checks) in this process.

    The console stays quiet (the caller prints the outcome); every event, at every level, is
    still written to the instance's event log (the UI and ``dcr audit`` read it).
    """
    job = job_for(defs, selection)
    run_config = _requested(defs, selection, _only_selected_ops(defs, selection, run_config or {}))
    collabs = sorted({k[0] for k in selection})
    tags = {"dcr/user": requester(), **({"dcr/collaboration": collabs[0]} if len(collabs) == 1 else {}),
            **process_tags(), **dict(tags or {})}
    config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **dict(run_config or {})}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_without_storage_noise())
        if stdout_log is not None:  # dbt's own output, kept for the curious, off the terminal
            stdout_log.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(stdout_log.open("a", encoding="utf-8"))))
        result = job.execute_in_process(
            run_config=config,
            instance=instance,
            tags=tags,
            raise_on_error=False,
            asset_selection=[dg.AssetKey(list(k)) for k in selection],
            partition_key=partition_key,
        )
    metadata: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        metadata[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    expected = {}  # refusals and waits, recorded as observations by the assets
    for event in result.get_asset_observation_events():
        observed = {k: v.value for k, v in event.asset_observation_data.asset_observation.metadata.items()}
        if observed.get("outcome") in ("refused", "waiting"):
            expected[event.asset_key.to_user_string() if event.asset_key else ""] = observed
    refused = [o for o in expected.values() if o["outcome"] == "refused"]
    waiting = [o for o in expected.values() if o["outcome"] == "waiting"]
    if not result.success:
        failure: str | None = _failure_message(result)
    else:
        failure = "; ".join(str(o.get("message", "")) for o in refused + waiting) or None
    return RunOutcome(result.success and not expected, result.run_id, failure, metadata, run_success=result.success,
                      refused=bool(refused), waiting=bool(waiting), job_name=job.name)


def job_for(defs: dg.Definitions, selection: Sequence[Sequence[str]]) -> dg.JobDefinition:
    """The collaboration's own job that holds every selected asset (so runs show on its job page and timeline);
    Dagster's implicit asset job only for a selection no single job holds (several collaborations, a test's mix)."""
    keys = {dg.AssetKey(list(k)) for k in selection}
    collabs = {k.path[0] for k in keys}
    if len(collabs) == 1:
        (c,) = collabs
        names = [naming.job_names(c)[n] for n in ("ad_hoc", "releases")]
        names += sorted(j.name for j in defs.jobs or [] if j.name.startswith(f"{c}__") and j.name.endswith("__uploads"))
        names.append(naming.job_names(c)["pipeline"])
        for name in names:
            try:
                job = defs.resolve_job_def(name)
            except Exception:  # noqa: S112 (a collaboration built without that job: try the next)
                continue
            if keys <= set(job.asset_layer.executable_asset_keys):
                return job
    return defs.resolve_implicit_global_asset_job_def()


PID_TAG, HOST_TAG = "dcr/pid", "dcr/host"


def process_tags() -> dict[str, str]:
    """Which process runs an in-process run: a run left STARTED by a process that died is marked failed later."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every run still NOT_STARTED, STARTING or STARTED whose in-process runner on this host is dead (killed,
    crashed; a kill between creating a run and starting it leaves it NOT_STARTED). Runs without our process tags (queued
    by the daemon, launched from the UI) are not ours to judge."""
    from .services.ingest import pid_alive

    host = socket.gethostname()
    failed = []
    statuses = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=statuses, tags={HOST_TAG: host}))
    for run in runs:
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            instance.report_run_failed(run, f"the process that ran it (pid {pid} on {host}) ended without finishing it (killed or crashed)")
            failed.append(run.run_id)
    return failed


def _requested(defs: dg.Definitions, selection: Sequence[Sequence[str]], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A `dcr` command is a request by its user: every release it selects carries ``requested_by`` (a release launched
    from the UI or `dg launch` must say who asks, or it is refused without a charge)."""
    ops = dict(run_config.get("ops") or {})
    for key in selection:
        if len(key) == 3 and key[1] == "results" and key[2] != "ad_hoc":
            name = defs.resolve_assets_def(dg.AssetKey(list(key))).op.name
            config = dict((ops.get(name) or {}).get("config") or {})
            config.setdefault("requested_by", requester())
            ops[name] = {**(ops.get(name) or {}), "config": config}
    return {**run_config, "ops": ops} if ops else dict(run_config)


def _only_selected_ops(defs: dg.Definitions, selection: Sequence[Sequence[str]], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Drop op config for steps outside the selection (one config can then serve a run with or without releases)."""
    ops = run_config.get("ops")
    if not ops:
        return dict(run_config)
    selected = {defs.resolve_assets_def(dg.AssetKey(list(k))).op.name for k in selection}
    return {**run_config, "ops": {name: value for name, value in ops.items() if name in selected}}


def collaboration_keys(defs: dg.Definitions, collab: str, *, releases: bool = False) -> list[list[str]]:
    """Every materializable asset of the collaboration's pipeline up to the pre-noise tables; with ``releases``,
    its releases too (they spend budget: only when someone asks). Never the on-demand ad-hoc query."""
    graph = defs.resolve_asset_graph()
    on_demand = naming.ad_hoc_key(collab)
    keys = []
    for k in graph.get_all_asset_keys():
        if not (k.path and k.path[0] == collab and graph.get(k).is_materializable and list(k.path) != on_demand):
            continue
        if not releases and len(k.path) == 3 and k.path[1] == "results":
            continue
        if graph.get(k).is_partitioned:  # an append-mode dataset's uploads: one run per file (see ingest_uploads)
            continue
        keys.append(list(k.path))
    return keys


def release_keys(defs: dg.Definitions, collab: str) -> list[list[str]]:
    return [k for k in collaboration_keys(defs, collab, releases=True) if len(k) == 3 and k[1] == "results"]


def requester() -> str:
    """Who is asking: DCR_USER, or the login of the shell (what the run's dcr/user tag and a release's audit entry say)."""
    return os.environ.get("DCR_USER") or getpass.getuser()


def analysis_run_config(collab: str, params_by_query: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """Parameters per query for the pre-noise tables and for the releases of those queries (the same request)."""
    ops: dict[str, Any] = {f"{collab}__analysis": {"config": {"params": {q: dict(p) for q, p in params_by_query.items()}}}}
    for query, params in params_by_query.items():
        ops[op_name(naming.release_key(collab, query))] = {"config": {"params": dict(params), "requested_by": requester()}}
    return {"ops": ops}


def release_run_config(collab: str, query: str, params: Mapping[str, str]) -> dict[str, Any]:
    return {"ops": {op_name(naming.release_key(collab, query)): {"config": {"params": dict(params), "requested_by": requester()}}}}


def ingest_run_config(collab: str, dataset: str, path: str = "", upload: int = 0) -> dict[str, Any]:
    return {"ops": {op_name(naming.raw_key(collab, dataset)): {"config": {"path": path, "upload": upload}}}}


def ingest_uploads(defs: dg.Definitions, loaded: Any, landing: Path, url: str, *, instance: dg.DagsterInstance,
                   stdout_log: Path | None = None) -> list[RunOutcome]:
    """Append-mode datasets: claim their landing folders and run one partition per waiting upload (oldest first).

    If the contract changed since the current version was checked, the newest accepted upload is re-processed
    (its run re-checks every file). Replace-mode datasets are left to the collaboration's run.
    """
    from .defs.ingest import partitions_name, target
    from .lib.database import connect
    from .services import ingest as ingest_lib
    from .store import uploads as queue

    outcomes = []
    for name, ds in loaded.collaboration.datasets.items():
        if ds.mode != "append":
            continue
        t = target(loaded, name, landing, url)
        with connect(url) as conn:
            keys = [u.partition_key for u in ingest_lib.intake(conn, t)]
            current = ingest_lib.current_version(conn, t)
            if not keys and current is not None and current.contract_sha256 != t.contract_sha256 and current.upload_seq:
                keys = [queue.partition_key(current.upload_seq)]
        if not keys:
            continue
        instance.add_dynamic_partitions(partitions_name(loaded.name, ds.owner, name), keys)
        for key in keys:
            outcomes.append(materialize(defs, [naming.raw_key(loaded.name, name)], instance=instance, partition_key=key,
                                        stdout_log=stdout_log, tags={"dcr/upload": key}))
    return outcomes


def ad_hoc_run_config(collab: str, runner: str, sql_text: str) -> dict[str, Any]:
    return {"ops": {op_name(naming.ad_hoc_key(collab)): {"config": {"runner": runner, "sql": sql_text}}}}
