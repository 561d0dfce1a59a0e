"""Members' requests, picked up by the operator's Dagster: one sensor per collaboration (and `dcr serve`, its loop).

A member login writes a request row (``store.member_requests``). Each tick:

- ``query_run`` and ``release`` become runs of the ad-hoc asset and of the query's release asset, with run key
  ``member-request:<id>`` (Dagster launches a run key once) and tags ``dcr/user`` (the login), ``dcr/member`` and
  ``dcr/request``; the run takes the row (``request`` in its config), does the work as for the operator's own command,
  and writes the answer, the refusal or the failure into the row;
- ``budget``, ``query_check``, a release's dry run (``dry_run`` in its payload), ``report`` (the member's own report,
  its files in the answer) and ``approve`` (``store.approvals``) read and spend nothing: they are answered in the tick;
- a request whose run ended without answering (killed, failed before it started) is marked failed with the run's id.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import ad_hoc, naming
from ..lib.naming import job_names, uploads_job_name
from ..lib.policy import LoadedCollaboration
from ..services import budget as budget_service
from ..store import member_requests
from .resources import WarehouseResource

REQUEST_TAG = "dcr/request"
MAX_RUNTIME_TAG, MAX_RUNTIME_S = "dagster/max_runtime", 1800  # run monitoring fails a member's run stuck longer than this
ANSWERER_TAG = "dcr/answerer"  # "serve": the run executed in a `dcr serve` process (not launched by the daemon)
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _op(key: list[str]) -> str:
    return "__".join(key)


def relay(context: Any, warehouse: WarehouseResource, request_id: int, events: Iterator[Any], answer: Any) -> Iterator[Any]:
    """The events of a run doing a member's request, passed on; the request row gets the outcome: a refusal's message, the
    answer (``answer(conn, metadata)`` on the materialization), or the failure's first line."""
    run_id = context.run.run_id
    try:
        for event in events:
            if isinstance(event, dg.AssetObservation) and event.metadata.get("outcome") == dg.MetadataValue.text("refused"):
                with warehouse.connect() as conn:
                    member_requests.finish(conn, request_id, "refused", reason=str(event.metadata["message"].value), run_id=run_id)
            elif isinstance(event, dg.MaterializeResult):
                meta = {k: getattr(v, "value", v) for k, v in (event.metadata or {}).items()}
                with warehouse.connect() as conn:
                    member_requests.finish(conn, request_id, "answered", run_id=run_id, answer=answer(conn, meta))
            yield event
    except BaseException as exc:
        with warehouse.connect() as conn:
            member_requests.finish(conn, request_id, "failed", run_id=run_id,
                                   reason=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise


def run_request(loaded: LoadedCollaboration, request: member_requests.Request) -> dg.RunRequest:
    c = loaded.name
    if request.kind == "query_run":
        key, job = naming.ad_hoc_key(c), job_names(c)["ad_hoc"]
    else:
        key, job = naming.release_key(c, str(request.payload.get("query"))), job_names(c)["releases"]
    return dg.RunRequest(
        run_key=f"member-request:{request.id}", job_name=job, asset_selection=[dg.AssetKey(key)],
        run_config={"ops": {_op(key): {"config": {"request": request.id}}}},
        tags={"dcr/collaboration": c, "dcr/user": request.login, "dcr/member": request.member, REQUEST_TAG: str(request.id),
              MAX_RUNTIME_TAG: str(MAX_RUNTIME_S)},
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
        checked = ad_hoc.check(loaded, request.member, str(request.payload.get("sql") or ""))
    except ad_hoc.QueryRefused as exc:
        member_requests.finish(conn, request.id, "refused", reason=str(exc))
        return
    member_requests.finish(conn, request.id, "answered", answer={"summary": checked.summary()})


def tick(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, cursor: int, landing: Path,
         unapproved: str | None = None) -> tuple[list[dg.RunRequest], int]:
    """One evaluation: run requests for the new work requests, answers for the rest; the new cursor. ``unapproved``: why
    ``loaded`` (then loaded without its approvals) is not approved yet; only approvals are answered until it is."""
    c = loaded.name
    runs: list[dg.RunRequest] = []
    for request in member_requests.pending(conn, c, after=cursor):
        cursor = max(cursor, request.id)
        try:
            if unapproved and request.kind != "approve" and not request.payload.get(member_requests.MALFORMED):
                member_requests.finish(conn, request.id, "refused", reason=f"{c} is not approved by every party yet ({unapproved}); until it "
                                       "is, only approvals (`dcr policy approve`) are answered")
                continue
            runs += _one(instance, conn, loaded, request, landing)
        except Exception as exc:  # one request must never stop the others (nor the loop that answers them)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            member_requests.finish(conn, request.id, "failed", reason=f"request #{request.id} could not be handled ({type(exc).__name__}: {first}); "
                                   "the operator can see it in the request sensor's log")
    _answer_uploads(instance, conn, loaded)
    _sweep(instance, conn, c, cursor)
    return runs, cursor


def _one(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, request: member_requests.Request, landing: Path) -> list[dg.RunRequest]:
    c = loaded.name
    runs: list[dg.RunRequest] = []
    if request.payload.get(member_requests.MALFORMED):
        member_requests.finish(conn, request.id, "refused", reason="the request's payload could not be read (a flat JSON object is expected)")
    elif request.kind == "query_run" and not isinstance(request.payload.get("sql"), str):
        member_requests.finish(conn, request.id, "refused", reason="query refused, nothing ran: the request has no SQL text")
    elif request.kind == "upload":
        run = _land(instance, conn, loaded, request, landing)
        runs += [run] if run is not None else []
    elif request.kind in ("budget", "query_check"):
        _answer_now(conn, loaded, request)
    elif request.kind == "approve":
        if member_requests.take(conn, request.id):  # once, when the sensor and `dcr serve` both tick: it writes the policy files
            _approve(conn, loaded, request)
    elif request.kind == "report":
        _report(instance, conn, loaded, request)
    elif request.kind == "release" and request.payload.get("dry_run") is True and str(request.payload.get("query")) in loaded.queries:
        _dry_run(conn, loaded, request)
    elif request.kind == "release" and str(request.payload.get("query")) not in loaded.queries:
        member_requests.finish(conn, request.id, "refused", reason=f"{c} has no approved query {request.payload.get('query')!r} "
                               f"(queries: {', '.join(loaded.queries) or 'none'})")
    else:
        runs.append(run_request(loaded, request))
    return runs


def _approve(conn: Any, loaded: LoadedCollaboration, request: member_requests.Request) -> None:
    """A member approves the operator's policy as it is now, if that is what its own copy holds: recorded in the policy
    files (for git review) and in the audit chain under its login (``store.approvals``), or refused with the difference."""
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.policy.approve import NothingToApprove, approval_payload, approve
    from ..lib.policy.loader import approvers
    from ..store import approvals

    c, member = loaded.name, request.member
    try:
        current = load_collaboration(loaded.folder, approvals=False)  # the operator's copy, as it is now
    except PolicyError as exc:
        member_requests.finish(conn, request.id, "refused", reason=f"approval refused, nothing was recorded: the operator's policy of {c} does "
                               f"not load ({exc.issues[0]}); the operator fixes it first")
        return
    if member not in approvers(current.collaboration):
        member_requests.finish(conn, request.id, "refused", reason=f"approval refused, nothing was recorded: {member} provides no data to {c}, "
                               "so no query or protection waits for its approval")
        return
    ours = approval_payload(current)
    theirs = {str(k): v for k, v in request.payload.items()}
    odd = sorted(k for k, v in theirs.items() if not (k.startswith(("query:", "protections:")) and isinstance(v, str)
                                                      and re.fullmatch(r"[0-9a-f]{64}", v)))
    if odd:
        member_requests.finish(conn, request.id, "refused", reason=f"approval refused, nothing was recorded: {odd[0]!r} is not what "
                               "`dcr policy approve` sends (query:NAME or protections:PARTY, each a SHA-256 in hex)")
        return
    counted = {k for k in set(ours) | set(theirs) if k.startswith("query:")} | {f"protections:{member}"}
    differ = sorted(k for k in counted if ours.get(k) != theirs.get(k))
    if differ:
        first = differ[0]
        what = "what protects your data" if first.startswith("protections:") else f"query {first.removeprefix('query:')!r}"
        mine, yours = str(ours.get(first) or "(none)"), str(theirs.get(first) or "(none)")
        member_requests.finish(conn, request.id, "refused", reason=(
            f"approval refused, nothing was recorded: your copy of {c}'s policy is not the operator's: {what} is sha256 {yours[:12]} in yours, "
            f"{mine[:12]} in the operator's" + (f" (and {len(differ) - 1} more difference(s))" if len(differ) > 1 else "")
            + "; get the reviewed policy (git pull), check it, and approve again"))
        return
    try:
        approve(loaded.folder, member)
    except (PolicyError, NothingToApprove) as exc:
        reason = str(exc.issues[0]) if isinstance(exc, PolicyError) else str(exc)
        member_requests.finish(conn, request.id, "refused", reason=f"approval refused, nothing was recorded: {reason}")
        return
    row = approvals.record(conn, current, member, request.login, request.id, {k: v for k, v in ours.items() if k in counted})
    member_requests.finish(conn, request.id, "answered", answer={
        "queries": {k.removeprefix("query:"): v for k, v in ours.items() if k.startswith("query:")},
        "protections_sha256": ours[f"protections:{member}"], "audit_seq": row.seq, "audit_chain_sha256": row.chain_sha256})


def _report(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, request: member_requests.Request) -> None:
    """The member's own report (what `dcr report --member` writes for it), its files in the answer for its client to write."""
    import base64

    from ..lib import member_report as page
    from ..services import member_report as gathered
    from . import audit as trail

    view = gathered.gather(conn, loaded, request.member, trail.entries(instance, loaded, party=request.member))
    with tempfile.TemporaryDirectory(prefix="dcr-member-report-") as folder:
        page.write(view, loaded, Path(folder))
        files = {str(p.relative_to(folder)): base64.b64encode(p.read_bytes()).decode() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    member_requests.finish(conn, request.id, "answered", answer={"files": files, "releases": len(view.releases), "uploads": len(view.uploads)})


def _dry_run(conn: Any, loaded: LoadedCollaboration, request: member_requests.Request) -> None:
    """What a release the member asks for would cost it (its consumer's budget: the member's own), drawing nothing."""
    query = loaded.queries[str(request.payload.get("query"))]
    spec = query.spec
    if request.member != spec.consumer:
        member_requests.finish(conn, request.id, "refused", reason=f"dry run refused: {query.name} is {spec.consumer}'s to ask for (it spends "
                               f"{spec.consumer}'s budget)")
        return
    answer: dict[str, Any] = {"rule": spec.rule, "consumer": spec.consumer}
    if spec.rule == "threshold":
        answer["min_distinct_units"] = spec.min_distinct_units
    else:
        answer |= {"plan": budget_service.dry_run(conn, loaded, query).to_json(), "averages": budget_service.averages(query)}
    member_requests.finish(conn, request.id, "answered", answer=answer)


def _land(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, request: member_requests.Request, landing: Path) -> dg.RunRequest | None:
    """A member's streamed file into its dataset's upload queue (as `dcr ingest` does), and the run that ingests it."""
    from ..lib.upload_files import SUFFIXES, accepted_suffix
    from ..services import ingest as ingest_lib
    from .ingest import partitions_name, target

    c = loaded.name
    name = str(request.payload.get("dataset"))
    ds = loaded.collaboration.datasets.get(name)
    refuse = None
    if ds is None:
        refuse = f"upload refused, nothing was queued: {c} declares no dataset {name!r} (datasets: {', '.join(loaded.collaboration.datasets)})"
    elif ds.owner != request.member:
        refuse = f"upload refused, nothing was queued: dataset {name} is {ds.owner}'s; {request.member} uploads only its own datasets"
    elif not accepted_suffix(str(request.payload.get("file_name")), ds.format.type):
        refuse = f"upload refused, nothing was queued: dataset {name} takes {ds.format.type} files ({', '.join(SUFFIXES[ds.format.type])})"
    if refuse or ds is None:
        member_requests.drop_chunks(conn, request)
        member_requests.finish(conn, request.id, "refused", reason=refuse)
        return None
    if not member_requests.take(conn, request.id):
        return None  # the sensor and `dcr serve` both on: the other one has it
    t = target(loaded, name, landing, "")
    with tempfile.TemporaryDirectory(prefix="dcr-member-upload-") as folder:
        try:
            path = member_requests.assemble(conn, request, Path(folder))
            upload = ingest_lib.land_copy(conn, t, path)
        except (ValueError, ingest_lib.LandingRefused, ingest_lib.UploadRejected) as exc:
            member_requests.drop_chunks(conn, request)
            member_requests.finish(conn, request.id, "refused", reason=f"upload refused, nothing was queued: {exc}")
            return None
    member_requests.mark_landed(conn, request.id, upload.seq)
    key = dg.AssetKey(naming.raw_key(c, name))
    tags = {"dcr/collaboration": c, "dcr/user": request.login, "dcr/member": request.member, REQUEST_TAG: str(request.id),
            "dcr/upload": upload.file_name}
    if ds.mode == "append":
        instance.add_dynamic_partitions(partitions_name(c, ds.owner, name), [upload.partition_key])
        return dg.RunRequest(run_key=f"member-request:{request.id}", job_name=uploads_job_name(c, ds.owner, name), asset_selection=[key],
                             partition_key=upload.partition_key, tags=tags)
    return dg.RunRequest(run_key=f"member-request:{request.id}", job_name=job_names(c)["pipeline"], asset_selection=[key],
                         run_config={"ops": {_op(list(key.path)): {"config": {"path": "", "upload": upload.seq}}}}, tags=tags)


def _answer_uploads(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration) -> None:
    """An upload request is answered once its file is decided (accepted, unchanged, or refused with the reason); if its
    run ended with the file still queued (the database failed), the member is told it waits for the next run."""
    from ..store import uploads as queue

    for request in member_requests.launched_uploads(conn, loaded.name):
        seq = int((request.answer or {}).get("upload") or 0)
        upload = queue.get(conn, seq) if seq else None
        if upload is None:
            if not seq and time.time() - request.asked_at.timestamp() > 600:  # taken, then the process died before queueing it
                member_requests.finish(conn, request.id, "failed", reason="the upload was interrupted before it was queued; send it again")
            continue
        if upload.state in ("queued", "processing"):
            runs = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: str(request.id), "dcr/collaboration": loaded.name}), limit=5)
            if runs and all(r.status in FINISHED for r in runs):
                member_requests.finish(conn, request.id, "failed", run_id=runs[0].run_id,
                                       reason=f"upload #{upload.seq} is queued but its run {runs[0].run_id} did not process it; the operator's next "
                                       "run (or the landing sensor) does: nothing needs sending again")
            continue
        answer = {"upload": upload.seq, "state": upload.state, "version": upload.version, "rows": upload.row_count,
                  "duplicate_rows": upload.duplicate_rows, "dropped_rows": upload.dropped_rows, "reason": upload.reason,
                  "dataset": upload.dataset, "file_name": upload.file_name}
        if upload.state in ("accepted", "duplicate"):
            member_requests.finish(conn, request.id, "answered", answer=answer)
        else:
            member_requests.finish(conn, request.id, "refused", answer=answer,
                                   reason=f"upload #{upload.seq} {upload.state}: {upload.reason}; the current data is unchanged")
    member_requests.drop_stale_chunks(conn)


def _sweep(instance: dg.DagsterInstance, conn: Any, collab: str, cursor: int) -> None:
    """A launched request whose run has finished without answering (killed, failed before its asset ran) is failed."""
    for request in member_requests.unfinished(conn, collab):
        if request.kind == "approve" and request.state == "launched" and time.time() - request.asked_at.timestamp() > 600:
            member_requests.finish(conn, request.id, "failed", reason="the approval was interrupted before it was answered; approve again")
            continue  # (taken by a process that died before it answered: an approval has no run)
        if request.id > cursor or request.kind == "upload" or time.time() - request.asked_at.timestamp() < 2:
            continue  # (an upload is answered from its file's decision, below)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: str(request.id), "dcr/collaboration": collab}), limit=5)
        ended = [r for r in runs if r.status in FINISHED]
        if ended and len(ended) == len(runs):
            member_requests.finish(conn, request.id, "failed", run_id=ended[0].run_id,
                                   reason=f"the run {ended[0].run_id} ended ({ended[0].status.value.lower()}) without an answer; the operator can see why "
                                   "in the Dagster UI; ask again")


def recover(instance: dg.DagsterInstance, conn: Any, collab: str) -> list[int]:
    """At the start of `dcr serve` (the one answerer of ``collab``, see ``listening``): the runs an earlier, killed
    `dcr serve` was executing never finish by themselves; each is marked failed in Dagster's storage (if the start of
    this process has not done so already), and a request one of them had taken is failed (an upload's is answered from
    its file's state by the next tick; a request still pending is simply done again). Returns the requests failed."""
    failed = []
    for request in member_requests.unfinished(conn, collab):
        runs = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_TAG: str(request.id), "dcr/collaboration": collab, ANSWERER_TAG: "serve"}))
        for run in runs:
            if run.status not in FINISHED:
                instance.report_run_failed(run, message="the `dcr serve` process executing this run stopped before it finished")
        if runs and request.kind != "upload" and request.state == "launched":
            member_requests.finish(conn, request.id, "failed", run_id=runs[0].run_id,
                                   reason=f"the process answering request #{request.id} stopped before it answered (run {runs[0].run_id}); "
                                   "ask again (what was charged, if anything, is answered from the store, free)")
            failed.append(request.id)
    return failed


def request_sensor(loaded: LoadedCollaboration, jobs: list[Any], landing: Path) -> dg.SensorDefinition:
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
            runs, cursor = tick(context.instance, conn, loaded, int(context.cursor or 0), landing)
        return dg.SensorResult(run_requests=runs, cursor=str(cursor))

    return member_requests_sensor


def serve(defs_for: Any, loaded: LoadedCollaboration, warehouse_url: str, instance: dg.DagsterInstance,
          materialize: Any, landing: Path, stop: Any = None, log: Any = None, unapproved: str | None = None,
          ready: Any = None) -> Iterator[int]:
    """The sensor's loop in this process, woken by the requests' notifications: each request's run executed here (a
    warm process answers in a fraction of a cold command's time). Yields each request id it ran. ``defs_for(job,
    loaded)`` gives the definitions a run of ``job`` needs. While ``unapproved``, only approvals are answered; once the
    members' approvals make the policy load, everything is."""
    from ..lib.policy import PolicyError, load_collaboration

    cursor = 0
    with member_requests.listening(warehouse_url, loaded.name) as wait:
        with member_requests.connect(warehouse_url) as conn:
            recovered = recover(instance, conn, loaded.name)
        if ready is not None:
            ready(recovered)
        while stop is None or not stop():
            with member_requests.connect(warehouse_url) as conn:
                runs, cursor = tick(instance, conn, loaded, cursor, landing, unapproved)
            try:  # the policy as the files hold it now (a change, an approval): what the next requests are answered by
                fresh = load_collaboration(loaded.folder)
                if unapproved or fresh.policy_sha256 != loaded.policy_sha256:
                    loaded, unapproved = fresh, None
            except PolicyError as exc:
                if unapproved:
                    unapproved = str(exc.issues[0])
            for run in runs:
                selection = [list(k.path) for k in run.asset_selection or []]
                outcome = materialize(defs_for(run.job_name, loaded), selection, instance=instance, run_config=run.run_config,
                                      tags={**run.tags, ANSWERER_TAG: "serve"}, partition_key=run.partition_key)
                if log is not None:
                    log(run, outcome)
                yield int(run.tags[REQUEST_TAG])
            if not runs:
                wait(1.0)
