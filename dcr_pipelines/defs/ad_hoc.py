"""Ad-hoc SQL of a member, as an asset; and the few definitions `dcr query run` needs (no dbt, no other collaboration).

A refusal (of a query here, of a release in defs/release.py) is an expected outcome: an
observation naming the rule, and a green run.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from ..lib import ad_hoc as ad_hoc_sql
from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..services import ad_hoc as ad_hoc_service
from ..store import member_requests
from . import freshness
from .common import AdHocConfig, audit_metadata, concerns
from .member_requests import relay
from .resources import WarehouseResource

OUTCOME_TAG = "dcr/outcome"


def tag_outcome(context: dg.AssetExecutionContext, outcome: str, rule: str | None = None) -> None:
    """Mark the run with an expected outcome that is not a success (refused, waiting): Dagster's runs list shows and filters run tags."""
    context.instance.add_run_tags(context.run.run_id, {OUTCOME_TAG: outcome, **({"dcr/refused_by": rule} if rule else {})})


def refusal(context: dg.AssetExecutionContext, message: str, *, rule: str, **details: Any) -> dg.AssetObservation:
    """An expected outcome, recorded as what it is: an observation naming the rule (the run stays green; `dcr` reports it),
    and the run tagged ``dcr/outcome: refused`` (with ``dcr/refused_by``) so the runs list tells it from an answered one."""
    context.log.warning(message)
    tag_outcome(context, "refused", rule)
    return dg.AssetObservation(
        asset_key=context.asset_key,
        description=message,
        metadata={"outcome": "refused", "message": message, "rule": rule,
                  **{k: (dg.MetadataValue.json(v) if isinstance(v, dict | list) else v) for k, v in details.items()}},
    )


def answer_of(result: Any, meta: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What a member's `dcr query run` prints (and `--format json` shows): the stored result with its mode's notes."""
    return {"run_id": run_id, "mode": result.mode, "columns": result.columns, "rows": result.rows,
            **({"epsilon_charged": result.epsilon, "answered_from_store": result.cached, "release_id": result.release_id,
                "epsilon_remaining": meta.get("epsilon_remaining"), "epsilon_budget": meta.get("epsilon_budget")} if result.mode == "dp" else
               {"withheld_rows": result.suppressed, "withheld_because": result.reasons, "min_distinct_units": meta.get("min_distinct_units")})}


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
        f"{', '.join(open_datasets) or 'no dataset (none allows ad-hoc SQL)'} and rewritten onto the matched views: answered with "
        "noise and charged to the runner's budget when a dataset read is under the differential_privacy rule, else exact and "
        "thresholded, per person; each run stores its rows for its runner only. A refused query is an observation naming the "
        "rule (not a failed run). Run with `dcr query run`.",
    )
    def ad_hoc(context: dg.AssetExecutionContext, config: AdHocConfig, warehouse: WarehouseResource) -> Iterator[Any]:
        if not config.request:
            yield from _ad_hoc(context, config.runner, config.sql, warehouse)
            return
        # A member's request (a row its login wrote): the runner is the member the row names, never the run's config.
        with warehouse.connect() as conn:
            try:
                asked = member_requests.claim(conn, config.request, c, "query_run", context.run.run_id)
            except LookupError as exc:  # taken by another run (the sensor and `dcr serve` both on), or not this kind: nothing to do
                context.log.info(f"nothing done: {exc}")
                return
        runner, sql_text = asked.member, str(asked.payload.get("sql") or "")
        context.log.info(f"member request #{asked.id} of {asked.login} ({runner})")
        yield from relay(context, warehouse, asked.id, _ad_hoc(context, runner, sql_text, warehouse),
                         lambda conn, meta: answer_of(ad_hoc_service.stored_result(conn, c, runner, context.run.run_id), meta, context.run.run_id))

    def _ad_hoc(context: dg.AssetExecutionContext, runner: str, sql_text: str, warehouse: WarehouseResource) -> Iterator[Any]:
        config = AdHocConfig(runner=runner, sql=sql_text)
        if not config.runner.strip() or not config.sql.strip():  # launched without a request (e.g. from the UI): nothing to check or chain
            yield refusal(context, "query refused, nothing ran or was charged: an ad-hoc run needs a request, config {runner: MEMBER, sql: \"SELECT ...\"}; "
                          "use `dcr query run COLLAB --member MEMBER \"SQL\"`", rule="request")
            return
        digest = ad_hoc_sql.query_sha256(config.sql)
        try:
            checked = ad_hoc_sql.check(loaded, config.runner, config.sql)
            with warehouse.connect() as conn:
                result = ad_hoc_service.execute(conn, loaded, checked, context.run.run_id, config.sql, freshness.staged(context.instance, conn, loaded))
        except ad_hoc_sql.QueryRefused as exc:
            datasets = ad_hoc_sql.datasets_named(loaded, config.sql)
            with warehouse.connect() as conn:  # refusals are in the audit chain too, with their time: they count against the daily cap
                chained = ad_hoc_service.record_refusal(conn, loaded, context.run.run_id, config.runner, config.sql, exc.rule, datasets)
            yield refusal(context, f"query refused: {exc}", rule=exc.rule, runner=config.runner, query_sha256=digest,
                          query=ad_hoc_sql.hashable(config.sql), datasets=", ".join(datasets), audit_chain_sha256=chained.chain_sha256,
                          **concerns(loaded, datasets, [config.runner]))
            return
        if result.failure:
            yield refusal(context, f"query failed: {result.failure}", rule="run time", runner=config.runner, query_sha256=digest,
                          query=ad_hoc_sql.hashable(config.sql), datasets=", ".join(checked.datasets), audit_chain_sha256=result.audit_chain_sha256,
                          **concerns(loaded, checked.datasets, [config.runner]))
            return
        if checked.dp is not None:
            context.log.info(f"ad-hoc query of {config.runner} (differential privacy): {len(result.rows)} rows released, "
                             + ("answered from the store, no charge" if result.cached else f"charged epsilon {result.epsilon:.4g}"))
        else:
            context.log.info(
                f"ad-hoc query of {config.runner}: {len(result.rows)} rows released (threshold {checked.min_distinct_units}"
                + ("; the whole result withheld by the difference check)" if result.suppressed else ")")
            )
        mode_metadata: dict[str, Any] = (
            {"mode": "differential privacy (opendp)", "epsilon_charged": result.epsilon, "cached": result.cached, "release_id": result.release_id or "",
             **({"epsilon_remaining": result.budget.remaining, "epsilon_budget": result.budget.total} if result.budget else {}),
             **({**audit_metadata(result.release_audit), "ad_hoc_chain_sha256": result.audit_chain_sha256} if result.release_audit
                else {"audit_chain_sha256": result.audit_chain_sha256})}
            if checked.dp is not None else
            {"mode": "exact (thresholded)", "min_distinct_units": checked.min_distinct_units, "suppressed_rows": dg.MetadataValue.int(result.suppressed),
             "suppressed_because": dg.MetadataValue.json(result.reasons), "difference_checks": loaded.collaboration.difference_checks.enabled,
             "audit_chain_sha256": result.audit_chain_sha256}
        )
        yield dg.MaterializeResult(
            metadata={
                "runner": config.runner,
                "query": ad_hoc_sql.hashable(config.sql),
                "query_sha256": digest,
                "kind": checked.kind,
                "datasets": ", ".join(checked.datasets),
                "rules": dg.MetadataValue.json(list(checked.rules)),
                "rows": dg.MetadataValue.int(len(result.rows)),
                **mode_metadata,
                "columns": ", ".join(result.columns),
                "policy_sha256": loaded.policy_sha256,
                **concerns(loaded, checked.datasets, [config.runner]),
            }
        )

    return ad_hoc


def ad_hoc_definitions(loaded: LoadedCollaboration, warehouse_url: str) -> dg.Definitions:
    """Just the ad-hoc asset of one collaboration, its job and the warehouse: what an ad-hoc run needs.

    The run is the same as through the full definitions (same asset key, job name, event log, audit
    chain), without loading dbt or every collaboration first (a second, not four, before the query starts).
    """
    job = dg.define_asset_job(naming.job_names(loaded.name)["ad_hoc"], selection=dg.AssetSelection.assets(dg.AssetKey(naming.ad_hoc_key(loaded.name))),
                              tags={"dcr/collaboration": loaded.name})
    return dg.Definitions(assets=[_ad_hoc_asset(loaded)], jobs=[job], resources={"warehouse": WarehouseResource(url=warehouse_url)},
                          executor=dg.in_process_executor)
