"""The two dbt stages (staging, analysis): one dbt invocation each, skipped when nothing they read or run changed."""

import hashlib
import hmac
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import dbt_assets

from ..lib import dbt_codegen, naming
from ..lib.database import advisory_lock
from ..lib.params import ParameterError, validate_params
from ..lib.policy import LoadedCollaboration
from ..services import ingest as ingest_lib
from ..services.release_request import analysis_lock_name, request_key
from ..services.release_request import digest as _digest
from ..store import analysis as store_analysis
from ..store import builder, stages
from ..store import matching as store_matching
from .common import PARTY_METADATA, AnalysisConfig, recorded_owners
from .dbt_project import CollaborationTranslator
from .dbt_project import hand_written_digest as _hand_written_digest
from .dbt_runner import DbtRunnerResource
from .resources import SecretsResource, WarehouseResource


def _rejections(warehouse: WarehouseResource, loaded: LoadedCollaboration, only: set[str] | None = None) -> Iterator[dg.AssetObservation]:
    """Per staged dataset (of ``only``, the rebuilt ones): rows in, rows staged, and identifiers rejected per reason (counts only)."""
    with warehouse.connect() as conn:
        counts = stages.staging_counts(conn, loaded, only)
    for name in loaded.collaboration.datasets:
        if name not in counts:
            continue
        yield dg.AssetObservation(asset_key=naming.staging_key(loaded.name, name),
                                  metadata={**{k: dg.MetadataValue.int(v) for k, v in counts[name].items()},
                                            PARTY_METADATA: loaded.collaboration.datasets[name].owner})


def _stage_relations(manifest: Mapping[str, Any], collab: str, stage: str) -> list[str]:
    """schema.alias of every model of one dbt stage (what must still exist for a build to be skipped)."""
    tags = {f"dcr_{collab}", f"dcr_{stage}"}
    return sorted(
        f"{node['schema']}.{node.get('alias') or node['name']}"
        for node in manifest.get("nodes", {}).values()
        if node.get("resource_type") == "model" and tags <= set(node.get("tags", []))
    )


def _model_of(manifest: Mapping[str, Any], key: dg.AssetKey) -> str | None:
    """The dbt model behind an asset key of a stage (through the ``meta.dcr.asset_key`` the code generator writes)."""
    for node in manifest.get("nodes", {}).values():
        meta = (node.get("config", {}).get("meta") or node.get("meta") or {}).get("dcr") or {}
        if meta.get("asset_key") == list(key.path):
            return str(node["name"])
    return None


def _dataset_relations(manifest: Mapping[str, Any], collab: str, dataset: str, loaded: LoadedCollaboration) -> list[str]:
    """schema.alias of one dataset's staging models (they must still exist for it to be left as it is)."""
    owner = loaded.collaboration.datasets[dataset].owner
    names = {naming.normalised_model(collab, owner, dataset), naming.staging_model(collab, owner, dataset), naming.identities_model(collab, owner)}
    return sorted(f"{n['schema']}.{n.get('alias') or n['name']}" for n in manifest.get("nodes", {}).values()
                  if n.get("resource_type") == "model" and n.get("name") in names)


def _appends_only(conn: Any, loaded: LoadedCollaboration, dataset: str, base: str) -> bool:
    """Whether the dataset's normalised table can take its new uploads incrementally: built from the same SQL, policy
    and key (``base``), and every upload it holds still current."""
    if stages.last_build(conn, loaded.name, f"staging/{dataset}/base") != base:
        return False
    owner = loaded.collaboration.datasets[dataset].owner
    held = stages.held_parts(conn, naming.raw_schema(loaded.name, owner), f"{dataset}__normalised")
    return held is not None and held <= set(stages.current_parts(conn, loaded.name, owner, dataset))


@dataclass(frozen=True)
class _StagingPlan:
    digests: dict[str, str]  # per dataset: its upload version, its owner's key, the SQL and policy
    bases: dict[str, str]  # the same without the upload version (what an incremental build must share with the last one)
    changed: set[str]
    unchanged: set[str]
    full: list[str]  # changed append-mode datasets that cannot take their new uploads incrementally


def _staging_plan(conn: Any, loaded: LoadedCollaboration, manifest: Mapping[str, Any], code: str, versions: Mapping[str, Any],
                  key_ids: Mapping[str, str]) -> _StagingPlan:
    """Which datasets changed since their last staging build, and which of those must be rebuilt from all their uploads."""
    c, datasets = loaded.name, loaded.collaboration.datasets
    digests = {name: _digest(code, loaded.policy_sha256, versions.get(f"{ds.owner}.{name}"), key_ids.get(ds.owner)) for name, ds in datasets.items()}
    bases = {name: _digest(code, loaded.policy_sha256, key_ids.get(ds.owner)) for name, ds in datasets.items()}
    unchanged = {name for name, d in digests.items() if stages.can_skip(conn, c, f"staging/{name}", d, _dataset_relations(manifest, c, name, loaded))}
    changed = set(digests) - unchanged
    full = sorted(n for n in changed if dbt_codegen.incremental(loaded, datasets[n]) and not _appends_only(conn, loaded, n, bases[n]))
    return _StagingPlan(digests, bases, changed, unchanged, full)


def _code_digest(loaded: LoadedCollaboration, dbt_project: Path) -> str:
    """The SQL a collaboration's dbt stages run: its generated models and the hand-written macros."""
    digest = hashlib.sha256(_hand_written_digest(dbt_project).encode())
    for rel, content in sorted(dbt_codegen.render(loaded).items()):
        digest.update(f"{rel}\0{content}\0".encode())
    return digest.hexdigest()


def _sealed(warehouse: WarehouseResource, loaded: LoadedCollaboration) -> None:
    """After a build, before anything reads it: the dbt login made its models and nothing else (store.builder.verify)."""
    with warehouse.connect() as conn:
        try:
            builder.verify(conn, loaded)
        except builder.BuilderTampered as exc:
            raise dg.Failure(str(exc)) from None


def _versioned(context: dg.AssetExecutionContext, loaded: LoadedCollaboration, events: Iterator[Any], digest: str) -> Iterator[Any]:
    """dbt's outputs with the stage digest (the inputs' versions, the policy, the SQL and the keys) as their Dagster data
    version: what downstream assets, the UI's staleness and a skipped build all agree on; a party-private model's
    output also records its party."""
    keys = context.assets_def.keys_by_output_name
    for event in events:
        if isinstance(event, dg.Output):
            owners = recorded_owners(loaded, keys[event.output_name]) if event.output_name in keys else {}
            yield dg.Output(value=event.value, output_name=event.output_name, metadata={**event.metadata, **owners},
                            data_version=dg.DataVersion(digest), tags=event.tags)
        elif isinstance(event, dg.AssetObservation) and (owners := recorded_owners(loaded, event.asset_key)):
            yield dg.AssetObservation(asset_key=event.asset_key, description=event.description, partition=event.partition,
                                      metadata={**event.metadata, **owners}, tags=event.tags)
        else:
            yield event


def _verdict(record: Any) -> bool | None:
    """Whether a check execution passed; None if it has no verdict (planned, skipped)."""
    event = record.event.dagster_event if record.event is not None else None
    return getattr(event.event_specific_data, "passed", None) if event is not None else None


def _skipped(context: dg.AssetExecutionContext, loaded: LoadedCollaboration, stage: str, digest: str,
             only: set[dg.AssetKey] | None = None) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """An unchanged stage (or the unchanged models ``only`` of it): its models are reported as not recomputed, and dbt
    does not run them. Each of their checks carries over its last verdict (the build these inputs made), so blocking
    checks still gate what is downstream: a check with no passing verdict on record fails here and blocks."""
    if only is None:
        context.log.info(f"{stage}: inputs, keys and SQL unchanged since the last build; dbt not run, its checks carried over")
    selected = context.selected_asset_keys if only is None else context.selected_asset_keys & only
    deps = context.assets_def.asset_deps
    order = TopologicalSorter({k: {d for d in deps.get(k, ()) if d in selected} for k in selected}).static_order()  # upstream first
    for key in order:
        yield dg.MaterializeResult(
            asset_key=key,
            data_version=dg.DataVersion(digest),
            metadata={"recomputed": False, "stage_digest": digest, **recorded_owners(loaded, key),
                      "checks_carried_over": dg.MetadataValue.int(sum(1 for c in context.selected_asset_check_keys if c.asset_key == key))},
        )
    checks = sorted((k for k in context.selected_asset_check_keys if k.asset_key in selected), key=lambda k: (k.asset_key.to_user_string(), k.name))
    storage = context.instance.event_log_storage
    for check in checks:
        # the latest execution with a verdict (this run's own planned one has none)
        history = storage.get_asset_check_execution_history(check, limit=5)
        last, verdict = next(((r, v) for r in history if (v := _verdict(r)) is not None), (None, None))
        passed = bool(verdict)
        yield dg.AssetCheckResult(
            asset_key=check.asset_key, check_name=check.name, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
            description=(f"unchanged since run {last.run_id[:8]}: its verdict carried over (dbt not run)" if passed and last is not None
                         else "no passing verdict on record for these inputs: blocked until the stage is rebuilt"),
            metadata={"carried_over_from_run": last.run_id if last is not None else "", "recomputed": False},
        )


def _dbt_stage(loaded: LoadedCollaboration, manifest: Mapping[str, Any], stage: str, dbt_project: Path) -> dg.AssetsDefinition:
    """One dbt invocation per stage; skipped when nothing it reads or runs has changed since its last successful build."""
    c = loaded.name
    translator = CollaborationTranslator()
    code = _code_digest(loaded, dbt_project)
    relations = _stage_relations(manifest, c, stage)

    select = f"tag:dcr_{c},tag:dcr_{stage}"
    if stage == "staging":

        @dbt_assets(manifest=manifest, select=select, name=f"{c}__staging", dagster_dbt_translator=translator)
        def staging(
            context: dg.AssetExecutionContext, dbt: DbtRunnerResource, warehouse: WarehouseResource, secrets: SecretsResource
        ) -> Iterator[Any]:
            with advisory_lock(warehouse.url, f"dcr-stage:{c}:staging"):  # one dbt build of a stage at a time; the next one skips
                yield from _staging(context, dbt, warehouse, secrets)

        def _staging(
            context: dg.AssetExecutionContext, dbt: DbtRunnerResource, warehouse: WarehouseResource, secrets: SecretsResource
        ) -> Iterator[Any]:
            keys = {p: secrets.hmac_key(c, p) for p in loaded.parties() if not loaded.at_home(p)}
            with warehouse.connect() as conn:
                breaches = ingest_lib.contract_breaches(conn, c, dict(loaded.collaboration.datasets))
                if breaches:  # a changed contract the loaded data does not meet (or not yet checked): nothing reads it
                    raise dg.Failure(f"not staging {c}: {', '.join(breaches)} has not passed the dataset's changed contract; "
                                     "see the ingest asset's upload_contract check, then upload corrected data or correct the contract")
                versions = ingest_lib.current_versions(conn, c)
                # Keys enter the digest only through an HMAC of a fixed label: a changed key rebuilds the tokens.
                key_ids = {p: hmac.new(k, b"dcr-stage-digest", hashlib.sha256).hexdigest() for p, k in keys.items()}
                digest = _digest(code, loaded.policy_sha256, versions, key_ids)
                if stages.can_skip(conn, c, "staging", digest, relations):
                    # Unchanged inputs (the digest holds the current versions): the staged tables hold the current uploads,
                    # and this materialization's provenance says so (it points at the raw asset's latest event).
                    yield from _skipped(context, loaded, "staging", digest)
                    return
            who = builder.login(c, secrets.pairing_key(c))
            whole = context.selected_asset_keys == context.assets_def.keys
            with warehouse.connect() as conn:
                plan = _staging_plan(conn, loaded, manifest, code, versions, key_ids)
            changed, unchanged, full = plan.changed, plan.unchanged, plan.full
            extra = ["--full-refresh"] if full else []
            if full:
                context.log.info(f"staging: {', '.join(full)} rebuilt from all uploads (SQL, policy or key changed, or an upload was withdrawn)")
            # dbt builds as the collaboration's builder login; the parties' keys are usable by it (never readable) only
            # for this build: the pads are deleted when it ends.
            with warehouse.connect() as keys_conn:
                builder.ensure(keys_conn, loaded, who)
                with builder.open_pads(keys_conn, who, keys):
                    if whole and unchanged and changed:
                        owners = {loaded.collaboration.datasets[n].owner for n in changed}
                        build = {naming.normalised_model(c, loaded.collaboration.datasets[n].owner, n) for n in changed}
                        build |= {naming.staging_model(c, loaded.collaboration.datasets[n].owner, n) for n in changed}
                        build |= {naming.identities_model(c, o) for o in owners}
                        keep = {k for k in context.assets_def.keys if _model_of(manifest, k) not in build}
                        context.log.info(f"staging: {', '.join(sorted(changed))} changed; {', '.join(sorted(unchanged))} unchanged and not rebuilt")
                        yield from _skipped(context, loaded, "staging", digest, only=keep)
                        yield from _versioned(context, loaded, dbt.build_stage(context, manifest, select, translator, who, models=sorted(build), extra=extra), digest)
                        _sealed(warehouse, loaded)
                        yield from _rejections(warehouse, loaded, changed)
                    else:
                        yield from _versioned(context, loaded, dbt.build_stage(context, manifest, select, translator, who, extra=extra), digest)
                        _sealed(warehouse, loaded)
                        yield from _rejections(warehouse, loaded)
            if whole:  # a partial build does not vouch for the whole stage
                with warehouse.connect() as conn:
                    stages.record_build(conn, c, "staging", digest)
                    for name, d in plan.digests.items():
                        stages.record_build(conn, c, f"staging/{name}", d)
                        stages.record_build(conn, c, f"staging/{name}/base", plan.bases[name])

        return staging

    @dbt_assets(manifest=manifest, select=select, name=f"{c}__analysis", dagster_dbt_translator=translator)
    def analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, dbt: DbtRunnerResource, warehouse: WarehouseResource,
                 secrets: SecretsResource) -> Iterator[Any]:
        with advisory_lock(warehouse.url, analysis_lock_name(c)):
            yield from _analysis(context, config, dbt, warehouse, secrets)

    def _analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, dbt: DbtRunnerResource, warehouse: WarehouseResource,
                  secrets: SecretsResource) -> Iterator[Any]:
        try:
            params = {name: validate_params(q, config.params.get(name, {})) for name, q in loaded.queries.items()}
            unknown = sorted(set(config.params) - set(loaded.queries))
            if unknown:
                raise ParameterError(f"{c} has no approved query {', '.join(unknown)}")
        except ParameterError as exc:
            raise dg.Failure(f"query parameters refused, nothing ran: {exc}") from None
        with warehouse.connect() as conn:
            versions = ingest_lib.current_versions(conn, c)
            match = store_matching.previous_match(conn, c)
            staged = stages.last_build(conn, c, "staging")
            # The build time too: a cross-reference rebuilt from the same identities has new match_ids.
            digest = _digest(code, loaded.policy_sha256, versions, params, match, staged)
            if match is not None and staged is not None and stages.can_skip(conn, c, "analysis", digest, relations):
                yield from _skipped(context, loaded, "analysis", digest)
                return
        requests = {q: request_key(query, params[q], versions, match) for q, query in loaded.queries.items()}
        who = builder.login(c, secrets.pairing_key(c))
        with warehouse.connect() as conn:
            store_analysis.record_requests(conn, c, {q: (params[q], requests[q]) for q in loaded.queries})
            builder.ensure(conn, loaded, who)
        yield from _versioned(context, loaded, dbt.build_stage(context, manifest, select, translator, who), digest)
        _sealed(warehouse, loaded)
        built = [q for q in loaded.queries if dg.AssetKey(naming.analysis_key(c, q)) in context.selected_asset_keys]
        with warehouse.connect() as conn:
            store_analysis.record_built(conn, c, {q: (params[q], requests[q]) for q in built}, versions,
                                        {q: dbt_codegen.model_digest(loaded, loaded.queries[q]) for q in built})
            if context.selected_asset_keys == context.assets_def.keys:
                stages.record_build(conn, c, "analysis", digest)

    return analysis
