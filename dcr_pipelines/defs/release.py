"""Releases on request, bound to their parameters."""

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..services import release_checks, release_request
from ..store import builder, member_requests
from ..store import results as store_results
from . import freshness
from .ad_hoc import refusal
from .common import (
    ReleaseConfig,
    _audit_metadata,
    concerns,
    release_preview,
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
            yield refusal(context, message, rule="request", consumer=spec.consumer, **concerns(loaded, query.datasets, spec.receivers))
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
        """The request answered by services/release_request.serve; here only its outcome in Dagster's terms."""
        try:
            outcome = release_request.serve(
                loaded, query_name, release_request.Request(config.requested_by, dict(config.params), context.run.run_id),
                url=warehouse.url, connect=warehouse.connect, staged=lambda conn: freshness.staged(context.instance, conn, loaded),
                build=lambda who: _build_model(model, dbt_project, who), pairing_key=secrets.pairing_key(c), exports=exports, log=context.log)
        except release_request.RequestFailed as exc:
            raise dg.Failure(str(exc)) from None
        if isinstance(outcome, release_request.Refused):
            yield refusal(context, outcome.message, rule=outcome.rule, consumer=spec.consumer, **concerns(loaded, query.datasets, spec.receivers),
                          **({"params": outcome.params} if outcome.params is not None else {}))
            yield from refused_checks(warehouse)
            return
        stored, params, versions, rebuild, checked = outcome.stored, outcome.params, outcome.versions, outcome.rebuilt, outcome.checked
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
                **concerns(loaded, query.datasets, spec.receivers),
            },
            check_results=_check_results(checked),
        )

    return release


def _check_results(outcomes: list[release_checks.CheckOutcome]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name=o.name, passed=o.passed, description=o.detail, metadata=o.metadata, severity=dg.AssetCheckSeverity.ERROR)
            for o in outcomes]


def _build_model(model: str, dbt_project: DbtProjectOf, who: builder.Login) -> release_request.Built:
    """dbt build of one pre-noise model, in this process. dbt is imported here, only when a request needs a rebuild
    (a stored release, the common case of `dcr release`, loads no dbt at all)."""
    from . import dbt_runner

    project, _ = dbt_project()
    built = dbt_runner.build(Path(project), ["--select", model], label=f"release-{model}", login=who)
    return release_request.Built(built.success, built.errors)


def release_definitions(loaded: LoadedCollaboration, settings: Any, warehouse_url: str) -> dg.Definitions:
    """Just one collaboration's releases, their job and the warehouse: what `dcr release` needs. The same runs as
    through the full definitions (asset keys, job, checks, event log); the dbt project is prepared only if a
    request's pre-noise table must be rebuilt."""

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
