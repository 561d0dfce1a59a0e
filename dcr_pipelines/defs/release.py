"""Releases on request (bound to their parameters) and ad-hoc queries."""

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource

from ..lib import adhoc, naming
from ..lib.database import advisory_lock
from ..lib.params import ParameterError, validate_params
from ..lib.policy import LoadedCollaboration
from ..services import adhoc as adhoc_service
from ..services import ingest as ingest_lib
from ..services import release_checks
from ..services.release import ReleaseRefused, release_query
from ..store import analysis as store_analysis
from ..store import audit_chain, ledger, stages
from ..store import matching as store_matching
from .common import (
    AdHocConfig,
    CollaborationTranslator,
    ReleaseConfig,
    _audit_metadata,
    analysis_lock_name,
    release_preview,
    request_key,
    warn_budget,
)
from .resources import WarehouseResource


def _release_asset(loaded: LoadedCollaboration, query_name: str, exports: Path, manifest: Mapping[str, Any]) -> dg.AssetsDefinition:
    c = loaded.name
    query = loaded.queries[query_name]
    spec = query.spec
    translator = CollaborationTranslator()
    model = naming.query_model(c, query_name)
    mechanism = f"differentially private (opendp, epsilon {spec.privacy.epsilon})" if spec.privacy else f"thresholded (groups under {spec.min_distinct_units} people removed, no noise)"

    def refused_checks(warehouse: WarehouseResource) -> Iterator[dg.AssetCheckResult]:
        """A refused request still answers its checks (Dagster expects every declared check of a step that ran)."""
        with warehouse.connect() as conn:
            yield from _check_results(release_checks.check_refusal(conn, loaded, query))

    @dg.asset(
        key=naming.release_key(c, query_name),
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
    def release(context: dg.AssetExecutionContext, config: ReleaseConfig, warehouse: WarehouseResource, dbt: DbtCliResource) -> Iterator[Any]:
        try:
            params = validate_params(query, config.params)
        except ParameterError as exc:
            yield refusal(context, f"release refused, nothing ran: {exc}", rule="parameters", consumer=spec.consumer)
            yield from refused_checks(warehouse)
            return
        # Build and release under one lock: the pre-noise table read is the one built for this request.
        with advisory_lock(warehouse.url, analysis_lock_name(c)):
            with warehouse.connect() as conn:
                versions = ingest_lib.current_versions(conn, c)
                key = request_key(query, params, versions, store_matching.previous_match(conn, c))
                cached = ledger.stored_release_id(conn, naming.results_schema(c), ledger.cache_key(query.sha256, params, versions))
                rebuild = cached is None and store_analysis.built_for(conn, c, query_name) != key
            if rebuild:
                context.log.info(f"{query_name}: building its pre-noise table for this request ({json.dumps(params)})")
                with warehouse.connect() as conn:
                    store_analysis.record_requests(conn, c, {query_name: (params, key)})
                invocation = dbt.cli(["build", "--select", model], manifest=manifest, dagster_dbt_translator=translator, raise_on_error=False)
                invocation.wait()
                if not invocation.is_successful():
                    raise dg.Failure(f"the pre-noise table of {query_name} could not be built for this request; nothing was released or charged (run log: dbt)")
                with warehouse.connect() as conn:
                    store_analysis.record_built(conn, c, {query_name: (params, key)}, versions)
                    stages.forget_build(conn, c, "analysis")
            with warehouse.connect() as conn:
                if cached is None and store_analysis.built_for(conn, c, query_name) != key:
                    raise dg.Failure(f"the pre-noise table of {query_name} was built for another request; nothing was released or charged")
                try:
                    stored = release_query(conn, loaded, query, params, versions, export_dir=exports, request=None if cached else key,
                                           run_id=context.run.run_id)
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
                "input_versions": dg.MetadataValue.json(versions),
                "pre_noise_rebuilt_for_request": rebuild,
                "query_sha256": query.sha256,
                "approvals": dg.MetadataValue.json(
                    [{"member": a.member, "sha256": a.sha256} for a in loaded.collaboration.approvals.get(query_name, ())]
                ),
                "policy_sha256": loaded.policy_sha256,
                "cells": dg.MetadataValue.int(len(stored.rows)),
                "rule": "differential privacy (opendp)" if spec.rule == "dp" else f"threshold: groups under {spec.min_distinct_units} people removed, exact values",
                **({"withheld_groups": dg.MetadataValue.int(len(stored.withheld)), "withheld_because": dg.MetadataValue.json(sorted(set(stored.withheld)))}
                   if spec.rule == "threshold" and not stored.cached else {}),
                **_audit_metadata(stored),
                "exports": ", ".join(f"{r}/{query_name}/{stored.release_id}.csv|parquet" for r in spec.receivers),
            },
            check_results=_check_results(checked),
        )

    return release


def _check_results(outcomes: list[release_checks.CheckOutcome]) -> list[dg.AssetCheckResult]:
    return [dg.AssetCheckResult(check_name=o.name, passed=o.passed, description=o.detail, metadata=o.metadata, severity=dg.AssetCheckSeverity.ERROR)
            for o in outcomes]


def refusal(context: dg.AssetExecutionContext, message: str, *, rule: str, **details: Any) -> dg.AssetObservation:
    """An expected outcome, recorded as what it is: an observation naming the rule (the run stays green; `dcr` reports it)."""
    context.log.warning(message)
    return dg.AssetObservation(
        asset_key=context.asset_key,
        description=message,
        metadata={"outcome": "refused", "message": message, "rule": rule,
                  **{k: (dg.MetadataValue.json(v) if isinstance(v, dict | list) else v) for k, v in details.items()}},
    )


def _ad_hoc_asset(loaded: LoadedCollaboration) -> dg.AssetsDefinition:
    c = loaded.name
    open_datasets = [name for name, ds in loaded.collaboration.datasets.items() if ds.analysis_rule.ad_hoc]

    @dg.asset(
        key=naming.ad_hoc_key(c),
        deps=[dg.AssetKey(naming.matched_key(c, name)) for name in open_datasets] or [dg.AssetKey(naming.cross_reference_key(c))],
        group_name=c,
        kinds={"postgres", "sql"},
        tags={"dcr/stage": "ad_hoc"},
        owners=["team:operator"],
        output_required=False,  # a refused query materializes nothing and is not a failed run
        description=f"Ad-hoc SQL of a member with the run_queries ability, checked against the analysis rules of "
        f"{', '.join(open_datasets) or 'no dataset (none allows ad-hoc SQL)'}, rewritten onto the matched views and thresholded; "
        "each run stores its rows for its runner only. A refused query is an observation naming the rule (not a failed run). "
        "Run with `dcr query run`.",
    )
    def ad_hoc(context: dg.AssetExecutionContext, config: AdHocConfig, warehouse: WarehouseResource) -> Iterator[Any]:
        digest = adhoc.query_sha256(config.sql)
        try:
            checked = adhoc.check(loaded, config.runner, config.sql)
            with warehouse.connect() as conn:
                result = adhoc_service.execute(conn, loaded, checked, context.run.run_id, config.sql)
        except adhoc.QueryRefused as exc:
            with warehouse.connect() as conn:  # refusals are in the audit chain too
                chained = audit_chain.append(conn, naming.results_schema(c), c, "refusal", context.run.run_id,
                                             {"run_id": context.run.run_id, "runner": config.runner, "query_sha256": digest, "rule": exc.rule,
                                              "datasets": adhoc.datasets_named(loaded, config.sql)})
            yield refusal(context, f"query refused: {exc}", rule=exc.rule, runner=config.runner, query_sha256=digest,
                          query=adhoc.hashable(config.sql), datasets=", ".join(adhoc.datasets_named(loaded, config.sql)),
                          audit_chain_sha256=chained.chain_sha256)
            return
        context.log.info(
            f"ad-hoc query of {config.runner}: {len(result.rows)} rows released (threshold {checked.min_distinct_units}"
            + (f"; {result.suppressed} withheld by the difference check)" if result.suppressed else ")")
        )
        yield dg.MaterializeResult(
            metadata={
                "runner": config.runner,
                "query": adhoc.hashable(config.sql),
                "query_sha256": digest,
                "kind": checked.kind,
                "datasets": ", ".join(checked.datasets),
                "rules": dg.MetadataValue.json(list(checked.rules)),
                "min_distinct_units": checked.min_distinct_units,
                "rows": dg.MetadataValue.int(len(result.rows)),
                "suppressed_rows": dg.MetadataValue.int(result.suppressed),
                "audit_chain_sha256": result.audit_chain_sha256,
                "suppressed_because": dg.MetadataValue.json(result.reasons),
                "difference_checks": loaded.collaboration.difference_checks.enabled,
                "columns": ", ".join(checked.columns),
                "policy_sha256": loaded.policy_sha256,
            }
        )

    return ad_hoc
