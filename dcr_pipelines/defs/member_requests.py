"""Members' requests, picked up by the operator's Dagster: one sensor per collaboration (and `dcr serve`, its loop).

A member login writes a request row (``store.member_requests``). Each tick:

- ``query_run`` and ``release`` become runs of the ad-hoc asset and of the query's release asset, with run key
  ``member-request:<id>`` (Dagster launches a run key once) and tags ``dcr/user`` (the login), ``dcr/member`` and
  ``dcr/request``; the run takes the row (``request`` in its config), does the work as for the operator's own command,
  and writes the answer, the refusal or the failure into the row;
- ``budget`` and ``query_check`` read and spend nothing: they are answered in the tick;
- a request whose run ended without answering (killed, failed before it started) is marked failed with the run's id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dagster as dg

from ..lib import adhoc, naming
from ..lib.naming import job_names
from ..lib.policy import LoadedCollaboration
from ..services import budget as budget_service
from ..store import member_requests
from .resources import WarehouseResource

REQUEST_TAG = "dcr/request"
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _op(key: list[str]) -> str:
    return "__".join(key)


def run_request(loaded: LoadedCollaboration, request: member_requests.Request) -> dg.RunRequest:
    c = loaded.name
    if request.kind == "query_run":
        key, job = naming.ad_hoc_key(c), job_names(c)["ad_hoc"]
    else:
        key, job = naming.release_key(c, str(request.payload.get("query"))), job_names(c)["releases"]
    return dg.RunRequest(
        run_key=f"member-request:{request.id}", job_name=job, asset_selection=[dg.AssetKey(key)],
        run_config={"ops": {_op(key): {"config": {"request": request.id}}}},
        tags={"dcr/collaboration": c, "dcr/user": request.login, "dcr/member": request.member, REQUEST_TAG: str(request.id)},
    )


def _answer_now(conn: Any, loaded: LoadedCollaboration, request: member_requests.Request) -> None:
    """Requests that read and spend nothing, answered in the tick."""
    if request.kind == "budget":
        report = budget_service.report(conn, loaded, None)
        mine = [c for c in report["consumers"] if c["consumer"] == request.member]
        owners = {o: [e for e in entries if o == request.member or e["consumer"] == request.member] for o, entries in report["owners"].items()}
        member_requests.finish(conn, request.id, "answered", answer={"consumers": mine, "owners": {o: e for o, e in owners.items() if e}})
        return
    try:
        checked = adhoc.check(loaded, request.member, str(request.payload.get("sql") or ""))
    except adhoc.QueryRefused as exc:
        member_requests.finish(conn, request.id, "refused", reason=str(exc))
        return
    member_requests.finish(conn, request.id, "answered", answer={"summary": checked.summary()})


def tick(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, cursor: int) -> tuple[list[dg.RunRequest], int]:
    """One evaluation: run requests for the new work requests, answers for the rest; the new cursor."""
    c = loaded.name
    runs: list[dg.RunRequest] = []
    for request in member_requests.pending(conn, c, after=cursor):
        cursor = max(cursor, request.id)
        if request.kind in ("budget", "query_check"):
            _answer_now(conn, loaded, request)
        elif request.kind == "release" and str(request.payload.get("query")) not in loaded.queries:
            member_requests.finish(conn, request.id, "refused", reason=f"{c} has no approved query {request.payload.get('query')!r} "
                                   f"(queries: {', '.join(loaded.queries) or 'none'})")
        else:
            runs.append(run_request(loaded, request))
    _sweep(instance, conn, c, cursor)
    return runs, cursor


def _sweep(instance: dg.DagsterInstance, conn: Any, collab: str, cursor: int) -> None:
    """A launched request whose run has finished without answering (killed, failed before its asset ran) is failed."""
    for request in member_requests.unfinished(conn, collab):
        if request.id > cursor or time.time() - request.asked_at.timestamp() < 2:
            continue
        runs = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: str(request.id), "dcr/collaboration": collab}), limit=5)
        ended = [r for r in runs if r.status in FINISHED]
        if ended and len(ended) == len(runs):
            member_requests.finish(conn, request.id, "failed", run_id=ended[0].run_id,
                                   reason=f"the run {ended[0].run_id} ended ({ended[0].status.value.lower()}) without an answer; the operator can see why "
                                   "in the Dagster UI; ask again")


def request_sensor(loaded: LoadedCollaboration, jobs: list[Any]) -> dg.SensorDefinition:
    c = loaded.name

    @dg.sensor(
        name=f"{c}__member_requests",
        jobs=jobs,
        minimum_interval_seconds=5,
        description=f"Members' requests of {c} (rows their logins write in dcr_meta.member_requests): an ad-hoc query or a release becomes "
        "a run tagged with the member's login; a budget or a query check is answered at once. `dcr serve` runs the same loop.",
    )
    def member_requests_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult:
        with warehouse.connect() as conn:
            runs, cursor = tick(context.instance, conn, loaded, int(context.cursor or 0))
        return dg.SensorResult(run_requests=runs, cursor=str(cursor))

    return member_requests_sensor


def serve(defs_for: Any, loaded: LoadedCollaboration, warehouse_url: str, instance: dg.DagsterInstance,
          materialize: Any, stop: Any = None, log: Any = None) -> Iterator[int]:
    """The sensor's loop in this process, woken by the requests' notifications: each request's run executed here (a
    warm process answers in a fraction of a cold command's time). Yields each request id it ran."""
    cursor = 0
    with member_requests.listening(warehouse_url) as wait:
        while stop is None or not stop():
            with member_requests.connect(warehouse_url) as conn:
                runs, cursor = tick(instance, conn, loaded, cursor)
            for run in runs:
                selection = [list(k.path) for k in run.asset_selection or []]
                outcome = materialize(defs_for(run.job_name), selection, instance=instance, run_config=run.run_config, tags=run.tags)
                if log is not None:
                    log(run, outcome)
                yield int(run.tags[REQUEST_TAG])
            if not runs:
                wait(1.0)
