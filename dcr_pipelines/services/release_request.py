"""One release request, start to end, with no Dagster in it: the release asset (defs/release.py) is its adapter.

The order is the privacy contract's: who asks, its parameters, the policy still being the one approved, then under the
collaboration's analysis lock the approvals in force, staged data that are current, the pre-noise table built for
exactly this request (or a stored identical release), the builder's tables untouched, and only then the release and
its charge (services/release.py, store/ledger.charge_release). Each way to stop is a value, :class:`Refused` (an
expected outcome: nothing ran or was charged, the asset records an observation) or :class:`RequestFailed` (a failure
of the run, nothing released or charged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lib import dbt_codegen, naming
from ..lib.database import advisory_lock
from ..lib.params import ParameterError, validate_params
from ..lib.policy import ApprovedQuery, LoadedCollaboration
from ..store import Connection, builder, ledger, stages
from ..store import analysis as store_analysis
from ..store import approvals as store_approvals
from ..store import matching as store_matching
from . import release_checks
from ._log import Log
from .release import ReleaseRefused, release_query


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def analysis_lock_name(collab: str) -> str:
    """The lock every build of a collaboration's pre-noise tables holds, and every release while it reads one."""
    return f"dcr-stage:{collab}:analysis"


def request_key(query: ApprovedQuery, params: dict[str, str], versions: dict[str, Any], match: tuple[str, int, Any] | None) -> str:
    """What a pre-noise table was built for: the query, its parameters, the uploads and the cross-reference it read."""
    return digest(query.sha256, params, versions, str(match[2]) if match else None)


@dataclass(frozen=True)
class Refused:
    """An expected outcome: the request was refused by ``rule``; nothing ran or was charged."""

    message: str
    rule: str
    params: dict[str, str] | None = None


@dataclass(frozen=True)
class Released:
    """A release (new, or an identical stored one), with what it read and the verdicts of its checks."""

    stored: ledger.StoredRelease
    params: dict[str, str]
    versions: dict[str, Any]
    rebuilt: bool
    checked: list[release_checks.CheckOutcome] = field(default_factory=list)


class RequestFailed(Exception):
    """The run failed (a pre-noise build, a tampered table, the ledger): nothing was released or charged."""


@dataclass(frozen=True)
class Built:
    success: bool
    errors: list[str]


@dataclass(frozen=True)
class Request:
    """What the asset hands over: who asks, with which parameters, in which run."""

    requested_by: str
    params: dict[str, Any]
    run_id: str


def policy_moved(loaded: LoadedCollaboration, query_name: str) -> str | None:
    """Why the policy files no longer hold the query this process loaded (its pre-noise model is rendered from the files,
    its approvals were checked against what was loaded), or None."""
    from ..lib.policy import PolicyError, load_collaboration

    try:
        fresh = load_collaboration(loaded.folder)
    except PolicyError as exc:
        return f"the policy of {loaded.name} no longer loads ({exc.issues[0]}); fix it, then reload"
    now = fresh.queries.get(query_name)
    if now is None or now.sha256 != loaded.queries[query_name].sha256:
        return (f"{query_name} changed in the policy files since this process loaded it; reload the code location (restart `dcr serve`, "
                "or Reload in the UI) so that what runs is what was approved")
    return None


# Database messages that depend on the query's text and the declared types only, never on a row: safe to show a consumer.
_STATIC_CAUSES = ("does not exist", "syntax error", "is ambiguous", "must appear in the GROUP BY", "cannot be matched", "could not identify",
                  "operator is not unique", "function is not unique", "invalid reference", "has no column")


def policy_cause(errors: list[str]) -> str:
    """The database's own message where it names the query's mistake (types, names, syntax); otherwise only that it failed:
    a message about a value (a cast that failed on a row) could quote data, so it stays in the operator's log."""
    for error in errors:
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        cause = next((line for line in lines if any(phrase in line for phrase in _STATIC_CAUSES)), None)
        if cause:
            return f"the database says: {cause}"
    return "the database refused it on the data (the operator's log has its message, which may quote a value)"


def serve(loaded: LoadedCollaboration, query_name: str, request: Request, *, url: str, connect: Callable[[], AbstractContextManager[Connection]],
          staged: Callable[[Connection], Any], build: Callable[[builder.Login], Built], pairing_key: bytes, exports: Path,
          log: Log) -> Refused | Released:
    """Answer one request for ``query_name``: a :class:`Refused` or a :class:`Released`; raises :class:`RequestFailed`.

    ``staged`` says what the staged data were built from (Dagster's provenance, defs/freshness.py); ``build`` builds the
    query's pre-noise model as the builder login (dbt) when the request needs it."""
    c, query = loaded.name, loaded.queries[query_name]
    if not request.requested_by.strip():
        return Refused(f"release refused, nothing ran or was charged: a release of {query_name} spends privacy budget, so it runs only "
                       f"on a request that says who asks (`dcr release {c} {query_name}`, a schedule the query opts into, or a launch "
                       "with config {requested_by: YOU, params: {...}})", "request")
    try:
        params = validate_params(query, request.params)
    except ParameterError as exc:
        return Refused(f"release refused, nothing ran: {exc}", "parameters")
    moved = policy_moved(loaded, query_name)
    if moved:
        return Refused(f"release refused, nothing ran or was charged: {moved}", "policy", params)
    # Build and release under one lock: the pre-noise table read is the one built for this request.
    with advisory_lock(url, analysis_lock_name(c)):
        with connect() as conn:
            # What the release reads is the staged data: it is labelled (and cached) by the upload versions staging was
            # built from, as Dagster's provenance records them, and refused while the event log holds a newer version
            # (it would be stale data under a new label).
            now = staged(conn)
            match = store_matching.previous_match(conn, c)
            unapproved = store_approvals.unbacked(conn, loaded, query_name)
        if unapproved:
            return Refused(f"release refused, nothing was released or charged: {unapproved[0]}", "approval", params)
        if now.stale:
            return Refused(f"release refused, nothing was released or charged: {', '.join(now.stale)} changed since the data was "
                           f"staged ({now.describe()}); run `dcr run {c}` first, then ask again", "stale data", params)
        versions: dict[str, Any] = {**now.versions(), "cross_reference": match[0] if match else None}
        with connect() as conn:
            key = request_key(query, params, versions, match)
            cached = ledger.stored_release_id(conn, naming.results_schema(c), ledger.cache_key(query.sha256, params, versions))
            # The view reads the request row; built_from says which model it is and which request it was set for.
            # Both must name this request (a failed build or a pipeline run may have moved one of them).
            serving = cached is None and (store_analysis.built_for(conn, c, query_name) != key or store_analysis.requested_for(conn, c, query_name) != key)
            built_from = store_analysis.model_built(conn, c, query_name) if serving else None
        rebuild = False
        if serving:
            model = dbt_codegen.model_digest(loaded, query)
            if built_from == model:  # the view is this model's: it serves this request once its parameters are recorded
                with connect() as conn, conn.transaction():  # the request row and built_from together, or neither
                    store_analysis.record_requests(conn, c, {query.name: (params, key)})
                    store_analysis.record_built(conn, c, {query.name: (params, key)}, versions)
                    stages.forget_build(conn, c, "analysis")
            else:  # another policy or code version since dbt built the view (or never built): dbt builds it first
                _rebuild(loaded, query, params, key, versions, model, connect=connect, build=build, pairing_key=pairing_key, log=log)
                rebuild = True
        with connect() as conn:
            if cached is None and store_analysis.built_for(conn, c, query_name) != key:
                raise RequestFailed(f"the pre-noise table of {query_name} was built for another request; nothing was released or charged")
            try:
                builder.verify(conn, loaded)  # the pre-noise table is the dbt login's: nothing else of it runs as this reader
            except builder.BuilderTampered as exc:
                raise RequestFailed(str(exc)) from None
            try:
                stored = release_query(conn, loaded, query, params, versions, export_dir=exports, request=None if cached else key,
                                       run_id=request.run_id, requested_by=request.requested_by.strip())
            except ledger.BudgetExhausted as exc:
                return Refused(f"release refused: {exc}", "budget", params)
            except ReleaseRefused as exc:
                return Refused(f"release refused: {exc}", "release", params)
            except ledger.ReleaseFailed as exc:
                raise RequestFailed(str(exc)) from None
            checked = release_checks.check_release(conn, loaded, query, stored, None if cached else key)
    return Released(stored, params, versions, rebuild, checked)


def _rebuild(loaded: LoadedCollaboration, query: ApprovedQuery, params: dict[str, str], key: str, versions: dict[str, Any], model: str, *,
             connect: Callable[[], AbstractContextManager[Connection]], build: Callable[[builder.Login], Built], pairing_key: bytes,
             log: Log) -> None:
    """The pre-noise view of ``query`` built by dbt from ``model`` for this request (its parameters recorded where it reads them)."""
    c = loaded.name
    log.info(f"{query.name}: its pre-noise view was built from another model (policy or code); dbt builds it for this request ({json.dumps(params)})")
    who = builder.login(c, pairing_key)
    with connect() as conn:
        store_analysis.record_requests(conn, c, {query.name: (params, key)})
        builder.ensure(conn, loaded, who)
    built = build(who)
    if not built.success:
        log.error(f"{query.name}: dbt build of its pre-noise model failed: " + "; ".join(built.errors))
        raise RequestFailed(f"the pre-noise table of {query.name} could not be built for this request; nothing was released or charged: "
                            f"{policy_cause(built.errors)} (the query is {query.sql_path})")
    with connect() as conn:
        store_analysis.record_built(conn, c, {query.name: (params, key)}, versions, {query.name: model})
        stages.forget_build(conn, c, "analysis")
