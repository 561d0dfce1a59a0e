"""Releases on request, bound to their parameters."""

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import naming
from ..lib.database import advisory_lock
from ..lib.params import ParameterError, validate_params
from ..lib.policy import LoadedCollaboration
from ..services import release_checks
from ..services.release import ReleaseRefused, release_query
from ..store import analysis as store_analysis
from ..store import approvals as store_approvals
from ..store import builder, ledger, member_requests, stages
from ..store import matching as store_matching
from ..store import results as store_results
from . import freshness
from .ad_hoc import refusal
from .common import (
    ReleaseConfig,
    _audit_metadata,
    analysis_lock_name,
    release_preview,
    request_key,
    warn_budget,
)
from .member_requests import relay
from .resources import SecretsResource, WarehouseResource

DbtProjectOf = Callable[[], tuple[Path, Mapping[str, Any]]]  # the prepared dbt project and its manifest, when a rebuild needs them


def _release_asset(loaded: LoadedCollaboration, query_name: str, exports: Path, dbt_project: DbtProjectOf) -> dg.AssetsDefinition:
    c = loaded.name
    query = loaded.queries[query_name]
    spec = query.spec
    model = naming.query_model(c, query_name)
    mechanism = f"differentially private (opendp, epsilon {spec.privacy.epsilon})" if spec.privacy else f"thresholded (groups under {spec.min_distinct_units} people removed, no noise)"

    def refused_checks(warehouse: WarehouseResource) -> Iterator[dg.AssetCheckResult]:
        """A refused request still answers its checks (Dagster expects every declared check of a step that ran)."""
        with warehouse.connect() as conn:
            yield from _check_results(release_checks.check_refusal(conn, loaded, query))

    @dg.asset(
        key=naming.release_key(c, query_name),
        code_version=query.sha256[:16],
        deps=[dg.AssetKey(naming.analysis_key(c, query_name))],
        group_name=c,
        kinds={"postgres", "opendp"} if spec.rule == "dp" else {"postgres", "python"},
        tags={"dcr/stage": "results", "dcr/consumer": spec.consumer, "dcr/release": spec.release, "dcr/rule": spec.rule},
        owners=[f"team:{spec.consumer}"],
        output_required=False,  # a refused request materializes nothing and is not a failed run
        check_specs=[dg.AssetCheckSpec(name, asset=naming.release_key(c, query_name), description=release_checks.DESCRIPTIONS[name])
                     for name in release_checks.names_for(query)],
        description=f"Release of {query_name}, {mechanism}, for {', '.join(spec.receivers)}"
        + (f"; charged to {spec.consumer}'s budget" if spec.rule == "dp" else "")
        + f". Only on request (config: params){' or by a schedule' if spec.release == 'scheduled' else ''}. "
        "A refused request (parameters, budget, a rule) is recorded as an observation naming the reason. " + (spec.description or ""),
    )
    def release(context: dg.AssetExecutionContext, config: ReleaseConfig, warehouse: WarehouseResource, secrets: SecretsResource) -> Iterator[Any]:
        if not config.request:
            yield from _release(context, config, warehouse, secrets)
            return
        # A member's request (a row its login wrote): only the query's consumer asks for it (it spends that budget).
        with warehouse.connect() as conn:
            try:
                asked = member_requests.claim(conn, config.request, c, "release", context.run.run_id)
            except LookupError as exc:  # taken by another run (the sensor and `dcr serve` both on), or not this kind: nothing to do
                context.log.info(f"nothing done: {exc}")
                yield from refused_checks(warehouse)
                return
        context.log.info(f"member request #{asked.id} of {asked.login} ({asked.member})")
        if asked.member != spec.consumer:
            message = (f"release refused, nothing ran or was charged: {query_name} is released to {spec.consumer}, who spends its budget; "
                       f"{asked.member} receives each release {spec.consumer} asks for (its results table)" if asked.member in spec.receivers else
                       f"release refused, nothing ran or was charged: {query_name} is {spec.consumer}'s to ask for (it spends {spec.consumer}'s budget)")
            with warehouse.connect() as conn:
                member_requests.finish(conn, asked.id, "refused", reason=message, run_id=context.run.run_id)
            yield refusal(context, message, rule="request", consumer=spec.consumer)
            yield from refused_checks(warehouse)
            return
        params = {str(k): str(v) for k, v in dict(asked.payload.get("params") or {}).items()}
        def answer(conn: Any, meta: dict[str, Any]) -> dict[str, Any]:
            return {"release_id": meta["release_id"], "cached": meta["cached"], "epsilon_charged": meta.get("epsilon_charged", 0.0),
                    "epsilon_remaining": meta.get("epsilon_remaining"), "epsilon_budget": meta.get("epsilon_budget"),
                    "params": meta.get("params"), "rows": store_results.release_rows(conn, c, str(meta["release_id"])),
                    "dimensions": list(spec.dimensions), "metrics": list(spec.metrics), "rule": spec.rule,
                    **({"withheld_rows": meta.get("withheld_groups", 0), "withheld_because": meta.get("withheld_because") or []}
                       if spec.rule == "threshold" else {})}

        yield from relay(context, warehouse, asked.id,
                         _release(context, ReleaseConfig(requested_by=f"{asked.member} (login {asked.login})", params=params), warehouse, secrets), answer)

    def _release(context: dg.AssetExecutionContext, config: ReleaseConfig, warehouse: WarehouseResource, secrets: SecretsResource) -> Iterator[Any]:
        if not config.requested_by.strip():
            yield refusal(context, f"release refused, nothing ran or was charged: a release of {query_name} spends privacy budget, so it runs only "
                          f"on a request that says who asks (`dcr release {c} {query_name}`, a schedule the query opts into, or a launch "
                          "with config {requested_by: YOU, params: {...}})", rule="request", consumer=spec.consumer)
            yield from refused_checks(warehouse)
            return
        try:
            params = validate_params(query, config.params)
        except ParameterError as exc:
            yield refusal(context, f"release refused, nothing ran: {exc}", rule="parameters", consumer=spec.consumer)
            yield from refused_checks(warehouse)
            return
        moved = _policy_moved(loaded, query_name)
        if moved:
            yield refusal(context, f"release refused, nothing ran or was charged: {moved}", rule="policy", consumer=spec.consumer, params=params)
            yield from refused_checks(warehouse)
            return
        # Build and release under one lock: the pre-noise table read is the one built for this request.
        with advisory_lock(warehouse.url, analysis_lock_name(c)):
            with warehouse.connect() as conn:
                # What the release reads is the staged data: it is labelled (and cached) by the upload versions staging was
                # built from, as Dagster's provenance records them, and refused while the event log holds a newer version
                # (it would be stale data under a new label).
                staged = freshness.staged(context.instance, conn, loaded)
                match = store_matching.previous_match(conn, c)
                unapproved = store_approvals.unbacked(conn, loaded, query_name)
            if unapproved:
                yield refusal(context, f"release refused, nothing was released or charged: {unapproved[0]}", rule="approval",
                              consumer=spec.consumer, params=params)
                yield from refused_checks(warehouse)
                return
            if staged.stale:
                yield refusal(context, f"release refused, nothing was released or charged: {', '.join(staged.stale)} changed since the data was "
                              f"staged ({staged.describe()}); run `dcr run {c}` first, then ask again",
                              rule="stale data", consumer=spec.consumer, params=params)
                yield from refused_checks(warehouse)
                return
            versions: dict[str, Any] = {**staged.versions(), "cross_reference": match[0] if match else None}
            with warehouse.connect() as conn:
                key = request_key(query, params, versions, match)
                cached = ledger.stored_release_id(conn, naming.results_schema(c), ledger.cache_key(query.sha256, params, versions))
                rebuild = cached is None and store_analysis.built_for(conn, c, query_name) != key
            if rebuild:
                context.log.info(f"{query_name}: building its pre-noise table for this request ({json.dumps(params)})")
                who = builder.login(c, secrets.pairing_key(c))
                with warehouse.connect() as conn:
                    store_analysis.record_requests(conn, c, {query_name: (params, key)})
                    builder.ensure(conn, loaded, who)
                built = _build_model(model, dbt_project, who)
                if not built.success:
                    context.log.error(f"{query_name}: dbt build of {model} failed: " + "; ".join(built.errors))
                    raise dg.Failure(f"the pre-noise table of {query_name} could not be built for this request; nothing was released or charged: "
                                     f"{_policy_cause(built.errors)} (the query is {query.sql_path})")
                with warehouse.connect() as conn:
                    store_analysis.record_built(conn, c, {query_name: (params, key)}, versions)
                    stages.forget_build(conn, c, "analysis")
            with warehouse.connect() as conn:
                if cached is None and store_analysis.built_for(conn, c, query_name) != key:
                    raise dg.Failure(f"the pre-noise table of {query_name} was built for another request; nothing was released or charged")
                try:
                    builder.verify(conn, loaded)  # the pre-noise table is the dbt login's: nothing else of it runs as this reader
                except builder.BuilderTampered as exc:
                    raise dg.Failure(str(exc)) from None
                try:
                    stored = release_query(conn, loaded, query, params, versions, export_dir=exports, request=None if cached else key,
                                           run_id=context.run.run_id, requested_by=config.requested_by.strip())
                except ledger.BudgetExhausted as exc:
                    yield refusal(context, f"release refused: {exc}", rule="budget", consumer=spec.consumer, params=params)
                    yield from refused_checks(warehouse)
                    return
                except ReleaseRefused as exc:
                    yield refusal(context, f"release refused: {exc}", rule="release", consumer=spec.consumer, params=params)
                    yield from refused_checks(warehouse)
                    return
                except ledger.ReleaseFailed as exc:
                    raise dg.Failure(str(exc)) from None
                checked = release_checks.check_release(conn, loaded, query, stored, None if cached else key)
        status = stored.budget
        context.log.info(
            f"{query_name}: release {stored.release_id} {'(stored result, no charge)' if stored.cached else f'charged epsilon {stored.epsilon:.4g}'}; "
            f"{spec.consumer} has {status.remaining:.4g} of {status.total:.4g} left"
        )
        if spec.rule == "dp":
            warn_budget(context, loaded, spec.consumer, status.remaining, status.total)
        yield dg.MaterializeResult(
            metadata={
                **release_preview(loaded, query_name, stored.rows),
                "release_id": stored.release_id,
                "cached": stored.cached,
                **({"epsilon_charged": 0.0 if stored.cached else stored.epsilon, "epsilon_of_release": stored.epsilon,
                    "epsilon_remaining": status.remaining, "epsilon_budget": status.total} if spec.rule == "dp" else {}),
                "consumer": spec.consumer,
                "receivers": ", ".join(spec.receivers),
                "params": dg.MetadataValue.json(params),
                "requested_by": config.requested_by.strip(),
                "input_versions": dg.MetadataValue.json(versions),
                "pre_noise_rebuilt_for_request": rebuild,
                "query_sha256": query.sha256,
                "approvals": dg.MetadataValue.json(
                    [{"member": a.member, "sha256": a.sha256} for a in loaded.collaboration.approvals.get(query_name, ())]
                ),
                "policy_sha256": loaded.policy_sha256,
                "cells": dg.MetadataValue.int(len(stored.rows)),
                "rule": "differential privacy (opendp)" if spec.rule == "dp" else f"threshold: groups under {spec.min_distinct_units} people removed, exact values",
                **({"withheld_groups": dg.MetadataValue.int(stored.withheld_rows), "withheld_because": dg.MetadataValue.json(sorted(set(stored.withheld)))}
                   if spec.rule == "threshold" and not stored.cached else {}),
                **_audit_metadata(stored),
                "exports": ", ".join(f"{r}/{query_name}/{stored.release_id}.csv|parquet" for r in spec.receivers),
            },
            check_results=_check_results(checked),
        )

    return release


def _policy_moved(loaded: LoadedCollaboration, query_name: str) -> str | None:
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


def _check_results(outcomes: list[release_checks.CheckOutcome]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name=o.name, passed=o.passed, description=o.detail, metadata=o.metadata, severity=dg.AssetCheckSeverity.ERROR)
            for o in outcomes]


def _build_model(model: str, dbt_project: DbtProjectOf, who: builder.Login) -> Any:
    """dbt build of one pre-noise model, in this process. dbt is imported here, only when a request needs a rebuild
    (a stored release, the common case of `dcr release`, loads no dbt at all)."""
    from . import dbt_runner

    project, _ = dbt_project()
    return dbt_runner.build(Path(project), ["--select", model], label=f"release-{model}", login=who)


# Database messages that depend on the query's text and the declared types only, never on a row: safe to show a consumer.
_STATIC_CAUSES = ("does not exist", "syntax error", "is ambiguous", "must appear in the GROUP BY", "cannot be matched", "could not identify",
                  "operator is not unique", "function is not unique", "invalid reference", "has no column")


def _policy_cause(errors: list[str]) -> str:
    """The database's own message where it names the query's mistake (types, names, syntax); otherwise only that it failed:
    a message about a value (a cast that failed on a row) could quote data, so it stays in the operator's log."""
    for error in errors:
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        cause = next((line for line in lines if any(phrase in line for phrase in _STATIC_CAUSES)), None)
        if cause:
            return f"the database says: {cause}"
    return "the database refused it on the data (the operator's log has its message, which may quote a value)"


def release_definitions(loaded: LoadedCollaboration, settings: Any, warehouse_url: str) -> dg.Definitions:
    """Just one collaboration's releases, their job and the warehouse: what `dcr release` needs. The same runs as
    through the full definitions (asset keys, job, checks, event log); the dbt project is prepared only if a
    request's pre-noise table must be rebuilt."""
    import json

    from ..lib.policy import check_policies

    def prepared() -> tuple[Path, Mapping[str, Any]]:
        from .dbt_project import prepare_project, project_dir

        every, _ = check_policies(settings.policies)  # the project holds every collaboration's models
        project = prepare_project(settings.dbt_source, project_dir(settings.dbt_project, settings.policies), every)
        return project.project_dir, json.loads(project.manifest_path.read_text())

    c = loaded.name
    job = dg.define_asset_job(naming.job_names(c)["releases"], selection=dg.AssetSelection.groups(c) & dg.AssetSelection.tag("dcr/stage", "results"),
                              tags={"dcr/collaboration": c})
    return dg.Definitions(assets=[_release_asset(loaded, q, settings.exports, prepared) for q in loaded.queries], jobs=[job],
                          resources={"warehouse": WarehouseResource(url=warehouse_url), "secrets": SecretsResource()}, executor=dg.in_process_executor)
