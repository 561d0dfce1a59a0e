"""The asset-group factory: one collaboration folder in, one Dagster asset group out.

Stages (keys are ``[collab, stage, name]``):

    raw/<party>__<dataset>        upload -> new version, swapped in atomically
    private/..., staging/...      dbt: normalise identifiers, keyed tokens, secure tables
    matching/cross_reference      PSI between the parties -> random match_id per person
    analysis/...                  dbt: matched views and bounded pre-noise aggregates
    results/<query>               opendp noise, budget charged, result stored
"""


import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterator, Mapping
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets

from ..lib import adhoc, dbt_codegen, home_psi, matching, naming
from ..lib.database import advisory_lock
from ..lib.keys import hmac_pads, pgoptions
from ..lib.params import ParameterError, validate_params
from ..lib.policy import ApprovedQuery, LoadedCollaboration, PolicyError, load_collaboration
from ..services import adhoc as adhoc_service
from ..services import ingest as ingest_lib
from ..services.release import ReleaseRefused, release_overlap, release_query
from ..store import access, audit_chain, ledger, stages
from ..store import analysis as store_analysis
from ..store import matching as store_matching
from .dbt_project import hand_written_digest as _hand_written_digest
from .resources import SecretsResource, WarehouseResource

T = TypeVar("T")
UPLOAD_SUFFIXES = {"csv": (".csv",), "parquet": (".parquet",), "jsonl": (".jsonl", ".json")}


class UploadConfig(dg.Config):
    """Which file to ingest; empty means the newest file in the dataset's landing folder."""

    path: str = ""


class AnalysisConfig(dg.Config):
    """Parameters per approved query: {"query": {"param": "value"}}; the queries' defaults fill the rest."""

    params: dict[str, dict[str, str]] = {}


class ReleaseConfig(dg.Config):
    """The request: the query's parameters (its YAML's defaults fill the rest). Each release is computed for exactly these."""

    params: dict[str, str] = {}


class AdHocConfig(dg.Config):
    """One ad-hoc SQL query and the member who runs it (see `dcr query run`)."""

    runner: str = ""
    sql: str = ""


class CollaborationTranslator(DagsterDbtTranslator):
    """Keys, groups and owners of generated models come from their ``meta.dcr`` block."""

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: Any) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        props = manifest.get("nodes", {}).get(unique_id) or manifest.get("sources", {}).get(unique_id) or {}
        meta = props.get("meta", {}).get("dcr") or props.get("config", {}).get("meta", {}).get("dcr")
        if not meta:
            return spec
        key = dg.AssetKey(meta["asset_key"])
        collab = key.path[0]
        tags = {"dcr/stage": meta.get("stage") or "source"}
        if meta.get("owner"):
            tags["dcr/party"] = meta["owner"]
        owners = [f"team:{meta['owner']}"] if meta.get("owner") else ["team:operator"]
        return spec.replace_attributes(key=key, group_name=collab, tags={**spec.tags, **tags}, owners=owners)


UPLOAD_CHECK = "upload_contract"
IGNORED_PREFIXES = (".", "_")
IGNORED_SUFFIXES = (".tmp", ".part", ".report.json")
PSI_FOLDER = "_psi"  # a home party's protocol messages, next to its dataset folders


def landing_folder(landing: Path, collab: str, party: str, dataset: str) -> Path:
    return landing / collab / party / dataset


def landing_files(landing: Path, collab: str, party: str, dataset: str, fmt: str) -> list[Path]:
    """Complete upload files waiting in a dataset's landing folder, oldest first."""
    folder = landing_folder(landing, collab, party, dataset)
    if not folder.is_dir():
        return []
    files = [
        p for p in folder.iterdir()
        if p.is_file() and p.suffix in UPLOAD_SUFFIXES[fmt] and not p.name.startswith(IGNORED_PREFIXES) and not p.name.endswith(IGNORED_SUFFIXES)
    ]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _ingest_asset(loaded: LoadedCollaboration, dataset_name: str, landing: Path) -> dg.AssetsDefinition:
    c = loaded.name
    ds = loaded.collaboration.datasets[dataset_name]
    party = ds.owner
    key = dg.AssetKey(naming.raw_key(c, party, dataset_name))
    folder = landing_folder(landing, c, party, dataset_name)

    @dg.asset(
        key=key,
        deps=[dg.AssetKey(naming.grants_key(c))],
        group_name=c,
        kinds={"postgres", ds.format.type},
        tags={"dcr/stage": "raw", "dcr/party": party},
        owners=[f"team:{party}"],
        check_specs=[dg.AssetCheckSpec(UPLOAD_CHECK, asset=key, blocking=True, description="The upload meets the dataset's contract (great-expectations).")],
        description=f"{party}'s upload of {dataset_name}: validated against its contract with great-expectations and swapped in "
        f"atomically as a new version of {naming.raw_schema(c, party)}.{dataset_name}. Landing folder: {folder}. " + (ds.description or ""),
    )
    def ingest(context: dg.AssetExecutionContext, config: UploadConfig, warehouse: WarehouseResource) -> Iterator[Any]:
        with advisory_lock(warehouse.url, f"dcr-ingest:{c}:{dataset_name}"):  # two runs at once: the second finds the file loaded
            yield from _ingest(context, config, warehouse)

    def _ingest(context: dg.AssetExecutionContext, config: UploadConfig, warehouse: WarehouseResource) -> Iterator[Any]:
        if config.path:
            path = Path(config.path)
        else:
            waiting = landing_files(landing, c, party, dataset_name, ds.format.type)
            path = waiting[-1] if waiting else None  # type: ignore[assignment]
        with warehouse.connect() as conn:
            if path is None:
                current = ingest_lib.current_versions(conn, c).get(f"{party}.{dataset_name}")
                if current is None:
                    raise dg.Failure(f"no upload for {c}/{party}/{dataset_name}: put a file in {folder} or run `dcr ingest`")
                context.log.info(f"{dataset_name}: no new upload; version {current['version']} stays current")
                yield dg.MaterializeResult(metadata={"version": current["version"], "unchanged": True, "checksum_sha256": str(current["checksum"])},
                                           check_results=[dg.AssetCheckResult(check_name=UPLOAD_CHECK, passed=True, metadata={"note": "no new upload"})],
                                           data_version=dg.DataVersion(str(current["checksum"])))
                return
            if not ingest_lib.inside(path, folder):
                raise dg.Failure(f"upload refused: {path} is outside the landing folder {folder} (symlinks resolved)")
            try:
                result = ingest_lib.ingest_file(conn, c, party, dataset_name, ds, path, naming.raw_schema(c, party), database_url=warehouse.url,
                                                  tokenised=loaded.at_home(party))
            except ingest_lib.UploadRejected as exc:
                report = {"file": path.name, "collaboration": c, "party": party, "dataset": dataset_name, "error": str(exc),
                          **(exc.report.to_json() if exc.report else {})}
                moved = ingest_lib.quarantine(path, landing / "_quarantine" / c / party / dataset_name, report, move=True)
                yield dg.AssetCheckResult(check_name=UPLOAD_CHECK, passed=False, metadata={"report": dg.MetadataValue.json(report), "quarantined_as": moved.name})
                raise dg.Failure(f"upload rejected, current data kept: {exc} (quarantined with a report as {moved.name})", metadata={"report": dg.MetadataValue.json(report)}) from None
        archived = landing / "_accepted" / c / party / dataset_name / path.name
        archived.parent.mkdir(parents=True, exist_ok=True)
        path.replace(archived)
        context.log.info(
            f"{dataset_name}: {f'unchanged (same checksum as version {result.version})' if result.unchanged else f'version {result.version} loaded'}"
        )
        rules = result.report.to_json()["rules"] if result.report else []
        yield dg.MaterializeResult(
            metadata={
                "version": result.version,
                "checksum_sha256": result.checksum,
                "row_count": dg.MetadataValue.int(result.rows),
                "unchanged": result.unchanged,
                "file_name": path.name,
                "null_fractions": dg.MetadataValue.json(result.null_fractions),
                "duplicate_rows": dg.MetadataValue.int(result.duplicate_rows),
                "policy_sha256": loaded.policy_sha256,
            },
            check_results=[dg.AssetCheckResult(check_name=UPLOAD_CHECK, passed=True, metadata={"rules": dg.MetadataValue.json(rules)})],
            data_version=dg.DataVersion(result.checksum),
        )

    return ingest


def _landing_sensor(loaded: LoadedCollaboration, landing: Path) -> dg.SensorDefinition:
    """New files in a dataset's landing folder launch that dataset's ingest (one run per file)."""
    c = loaded.name
    raw_keys = [dg.AssetKey(naming.raw_key(c, ds.owner, name)) for name, ds in loaded.collaboration.datasets.items()]

    @dg.sensor(
        name=f"{c}__landing_files",
        asset_selection=raw_keys,
        minimum_interval_seconds=30,
        description=f"Launches the ingest of each new file under {landing / c}/<party>/<dataset>/.",
    )
    def landing_sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        seen = set(json.loads(context.cursor)) if context.cursor else set()
        declared = {(ds.owner, name) for name, ds in loaded.collaboration.datasets.items()}
        for party_dir in sorted(p for p in (landing / c).glob("*") if p.is_dir() and not p.name.startswith(IGNORED_PREFIXES)):
            for dataset_dir in sorted(p for p in party_dir.glob("*") if p.is_dir() and not p.name.startswith(IGNORED_PREFIXES)):
                if (party_dir.name, dataset_dir.name) not in declared:
                    context.log.warning(f"{dataset_dir}: {c} declares no dataset {dataset_dir.name!r} of {party_dir.name!r}; files there are ignored")
        requests = 0
        for name, ds in loaded.collaboration.datasets.items():
            for path in landing_files(landing, c, ds.owner, name, ds.format.type):
                stat = path.stat()
                run_key = f"{path.relative_to(landing)}:{stat.st_mtime_ns}:{stat.st_size}"
                if run_key in seen:
                    continue
                seen.add(run_key)
                requests += 1
                yield dg.RunRequest(
                    run_key=run_key,
                    asset_selection=[dg.AssetKey(naming.raw_key(c, ds.owner, name))],
                    run_config={"ops": {"__".join(naming.raw_key(c, ds.owner, name)): {"config": {"path": str(path)}}}},
                    tags={"dcr/upload": path.name, "dcr/collaboration": c},
                )
        context.update_cursor(json.dumps(sorted(seen)[-1000:]))
        if not requests:
            yield dg.SkipReason("no new upload files")

    return landing_sensor


def _spawn_with_env(extra: Mapping[str, str], start: Callable[[], T]) -> T:
    """Run ``start`` (which spawns a subprocess) with ``extra`` in the environment, then restore it.

    The subprocess copies the environment when it starts; this process keeps
    the values only for the instant of the spawn.
    """
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        return start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rejections(warehouse: WarehouseResource, loaded: LoadedCollaboration) -> Iterator[dg.AssetObservation]:
    """Per staged dataset: rows in, rows staged, and identifiers rejected per reason (counts only)."""
    with warehouse.connect() as conn:
        counts = stages.staging_counts(conn, loaded)
    for name, ds in loaded.collaboration.datasets.items():
        yield dg.AssetObservation(asset_key=naming.staging_key(loaded.name, ds.owner, name),
                                  metadata={k: dg.MetadataValue.int(v) for k, v in counts[name].items()})


def _stage_relations(manifest: Mapping[str, Any], collab: str, stage: str) -> list[str]:
    """schema.alias of every model of one dbt stage (what must still exist for a build to be skipped)."""
    tags = {f"dcr_{collab}", f"dcr_{stage}"}
    return sorted(
        f"{node['schema']}.{node.get('alias') or node['name']}"
        for node in manifest.get("nodes", {}).values()
        if node.get("resource_type") == "model" and tags <= set(node.get("tags", []))
    )


def _code_digest(loaded: LoadedCollaboration, dbt_project: Path) -> str:
    """The SQL a collaboration's dbt stages run: its generated models and the hand-written macros."""
    digest = hashlib.sha256(_hand_written_digest(dbt_project).encode())
    for rel, content in sorted(dbt_codegen.render(loaded).items()):
        digest.update(f"{rel}\0{content}\0".encode())
    return digest.hexdigest()


def _skipped(context: dg.AssetExecutionContext, stage: str, digest: str) -> Iterator[dg.MaterializeResult]:
    """An unchanged stage: its models are reported as not recomputed, and its dbt checks are not run, so this run
    yields no evaluation for them and Dagster records them as skipped (their last verdict stays with the run that made it)."""
    context.log.info(f"{stage}: inputs, keys and SQL unchanged since the last build; dbt not run, its checks skipped")
    selected = context.selected_asset_keys
    deps = context.assets_def.asset_deps
    order = TopologicalSorter({k: {d for d in deps.get(k, ()) if d in selected} for k in selected}).static_order()  # upstream first
    skipped = sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in context.selected_asset_check_keys)
    for key in order:
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={"recomputed": False, "stage_digest": digest,
                      "checks_skipped": dg.MetadataValue.int(sum(1 for c in context.selected_asset_check_keys if c.asset_key == key))},
        )
    if skipped:
        context.log.info(f"{stage}: {len(skipped)} dbt check(s) not run (they ran, and passed, when the stage was built from these inputs)")


def _dbt_stage(loaded: LoadedCollaboration, manifest: Mapping[str, Any], stage: str, dbt_project: Path) -> dg.AssetsDefinition:
    """One dbt invocation per stage; skipped when nothing it reads or runs has changed since its last successful build."""
    c = loaded.name
    translator = CollaborationTranslator()
    code = _code_digest(loaded, dbt_project)
    relations = _stage_relations(manifest, c, stage)

    if stage == "staging":

        @dbt_assets(manifest=manifest, select=f"tag:dcr_{c},tag:dcr_staging", name=f"{c}__staging", dagster_dbt_translator=translator)
        def staging(
            context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource, secrets: SecretsResource
        ) -> Iterator[Any]:
            with advisory_lock(warehouse.url, f"dcr-stage:{c}:staging"):  # one dbt build of a stage at a time; the next one skips
                yield from _staging(context, dbt, warehouse, secrets)

        def _staging(
            context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource, secrets: SecretsResource
        ) -> Iterator[Any]:
            keys = {p: secrets.hmac_key(c, p) for p in loaded.parties() if not loaded.at_home(p)}
            with warehouse.connect() as conn:
                versions = ingest_lib.current_versions(conn, c)
                # Keys enter the digest only through an HMAC of a fixed label: a changed key rebuilds the tokens.
                key_ids = {p: hmac.new(k, b"dcr-stage-digest", hashlib.sha256).hexdigest() for p, k in keys.items()}
                digest = _digest(code, loaded.policy_sha256, versions, key_ids)
                if stages.can_skip(conn, c, "staging", digest, relations):
                    yield from _skipped(context, "staging", digest)
                    return
            pads = {p: hmac_pads(k) for p, k in keys.items()}
            options = " ".join(filter(None, [os.environ.get("PGOPTIONS", ""), pgoptions(pads)]))
            invocation = _spawn_with_env({"PGOPTIONS": options}, lambda: dbt.cli(["build"], context=context))
            yield from invocation.stream()
            yield from _rejections(warehouse, loaded)
            if context.selected_asset_keys == context.assets_def.keys:  # a partial build does not vouch for the whole stage
                with warehouse.connect() as conn:
                    stages.record_build(conn, c, "staging", digest)

        return staging

    @dbt_assets(manifest=manifest, select=f"tag:dcr_{c},tag:dcr_analysis", name=f"{c}__analysis", dagster_dbt_translator=translator)
    def analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, dbt: DbtCliResource, warehouse: WarehouseResource) -> Iterator[Any]:
        with advisory_lock(warehouse.url, analysis_lock_name(c)):
            yield from _analysis(context, config, dbt, warehouse)

    def _analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, dbt: DbtCliResource, warehouse: WarehouseResource) -> Iterator[Any]:
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
                yield from _skipped(context, "analysis", digest)
                return
        requests = {q: request_key(query, params[q], versions, match) for q, query in loaded.queries.items()}
        with warehouse.connect() as conn:
            store_analysis.record_requests(conn, c, {q: (params[q], requests[q]) for q in loaded.queries})
        yield from dbt.cli(["build"], context=context).stream()
        built = [q for q in loaded.queries if dg.AssetKey(naming.analysis_key(c, q)) in context.selected_asset_keys]
        with warehouse.connect() as conn:
            store_analysis.record_built(conn, c, {q: (params[q], requests[q]) for q in built}, versions)
            if context.selected_asset_keys == context.assets_def.keys:
                stages.record_build(conn, c, "analysis", digest)

    return analysis


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def analysis_lock_name(collab: str) -> str:
    """The lock every build of a collaboration's pre-noise tables holds, and every release while it reads one."""
    return f"dcr-stage:{collab}:analysis"


def request_key(query: ApprovedQuery, params: dict[str, str], versions: dict[str, Any], match: tuple[str, int, Any] | None) -> str:
    """What a pre-noise table was built for: the query, its parameters, the uploads and the cross-reference it read."""
    return _digest(query.sha256, params, versions, str(match[2]) if match else None)


def _bucket_asset(loaded: LoadedCollaboration, bucket: int) -> dg.AssetsDefinition:
    """One hash bucket of the PSI as its own step, so a distributed executor can run buckets on different workers."""
    c = loaded.name
    client = loaded.matching_client()
    at_operator = [client] + [p for p in loaded.parties() if not loaded.at_home(p) and p != client]
    buckets = loaded.collaboration.matching.buckets

    @dg.asset(
        key=naming.bucket_key(c, bucket),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching", "dcr/bucket": str(bucket)},
        owners=["team:operator"],
        description=f"PSI of bucket {bucket} of {buckets} ({', '.join(at_operator)}): the matched people's tokens, no match_id yet. "
        "Each bucket is its own step (matching.bucket_steps), so Celery or Kubernetes workers can share them.",
    )
    def bucket_step(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> dg.MaterializeResult:
        inputs = store_matching.read_identities(warehouse.url, loaded, at_operator, bucket)
        digest = matching.bucket_digest(inputs, client, buckets, bucket)
        columns = [naming.party_token_column(p) for p in at_operator]
        with warehouse.connect() as conn:
            previous = store_matching.bucket_build(conn, loaded, columns, bucket)
        if previous is not None and previous[0] == digest:
            context.log.info(f"bucket {bucket}: identities unchanged, no PSI work")
            return dg.MaterializeResult(metadata={"recomputed": False, "matched": dg.MetadataValue.int(previous[1])}, data_version=dg.DataVersion(digest))
        if len(inputs) == 1:  # only parties at home besides the client: their answer is applied when the buckets are assembled
            pairs: list[tuple[str, ...]] = [(t,) for t in inputs[0].tokens]
            exchanged = 0
        else:
            result = matching.match(inputs, client, buckets=1, workers=1)
            assert result.parties == tuple(at_operator)
            pairs, exchanged = [row[1:] for row in result.rows], result.bytes_exchanged
        with warehouse.connect() as conn:
            store_matching.write_bucket(conn, loaded, columns, bucket, pairs, digest, exchanged)
        context.log.info(f"bucket {bucket}: {len(pairs)} matched")
        return dg.MaterializeResult(
            metadata={"recomputed": True, "matched": dg.MetadataValue.int(len(pairs)), "bytes_exchanged": dg.MetadataValue.int(exchanged),
                      **{f"input_rows_{inp.party}": dg.MetadataValue.int(len(inp.tokens)) for inp in inputs}},
            data_version=dg.DataVersion(digest),
        )

    return bucket_step


def _assemble_buckets(conn: Any, loaded: LoadedCollaboration, inputs: list[matching.PartyInput], home: list[home_psi.HomeMatch]) -> matching.MatchResult:
    """The cross-reference from the bucket steps' matches: every bucket checked against the current identities first."""
    c, buckets = loaded.name, loaded.collaboration.matching.buckets
    client = loaded.matching_client()
    columns = [naming.party_token_column(inp.party) for inp in inputs]
    stored = store_matching.bucket_digests(conn, loaded, columns)
    expected = {b: matching.bucket_digest(part, client, buckets, b) for b, part in enumerate(matching.split(inputs, buckets))}
    stale = [b for b in range(buckets) if stored.get(b) != expected[b]]
    if stale:
        raise dg.Failure(
            f"bucket(s) {', '.join(map(str, stale[:10]))} were matched from other identities than the current ones; "
            f"materialize {', '.join('/'.join(naming.bucket_key(c, b)) for b in stale[:3])}{' ...' if len(stale) > 3 else ''} first (previous cross-reference kept)"
        )
    pairs, exchanged = store_matching.bucket_pairs(conn, loaded, columns)
    client_input = inputs[0]
    home_by_token = [{client_input.tokens[i]: tok for i, tok in h.by_client_index.items()} for h in home]
    matched = [(*pair, *(m[pair[0]] for m in home_by_token)) for pair in pairs if all(pair[0] in m for m in home_by_token)]
    parties = (*(inp.party for inp in inputs), *(h.party for h in home))
    rows = matching.assemble(parties, matched, [*(inp.tokens for inp in inputs), *(h.tokens for h in home)], loaded.collaboration.matching.padding)
    counts = {inp.party: len(inp.identifiers) for inp in inputs} | {h.party: len(h.tokens) for h in home}
    return matching.MatchResult(parties, rows, counts, exchanged, len(matched))


def _home_inputs(loaded: LoadedCollaboration, landing: Path) -> dict[str, home_psi.Message]:
    """Each home party's newest setup message, from its landing folder's ``_psi`` directory."""
    c, out = loaded.name, {}
    for party in loaded.collaboration.matching.home_parties:
        folder = landing_folder(landing, c, party, PSI_FOLDER)
        found = sorted(folder.glob(f"*setup*{home_psi.SUFFIX}"), key=lambda p: (p.stat().st_mtime_ns, p.name)) if folder.is_dir() else []
        if not found:
            raise dg.Failure(
                f"waiting for {party}'s PSI setup message: {party} runs `dcr psi prepare {c} --party {party} ...` on its own machine "
                f"and puts {party}-setup{home_psi.SUFFIX} into {folder}"
            )
        try:
            out[party] = home_psi.read_message(found[-1], "setup", c, party)
        except home_psi.MessageError as exc:
            raise dg.Failure(f"PSI message refused, previous cross-reference kept: {exc}") from None
    return out


def _home_matches(
    loaded: LoadedCollaboration, setups: Mapping[str, home_psi.Message], client_input: matching.PartyInput, pairing_key: bytes,
    landing: Path, exports: Path,
) -> list[home_psi.HomeMatch]:
    """Complete the match with each home party's answer to the current request, or write the request and wait for it."""
    c, out, waiting = loaded.name, [], []
    for party, setup in setups.items():
        rid = home_psi.request_id(c, party, client_input.identifiers)
        response_path = landing_folder(landing, c, party, PSI_FOLDER) / f"{party}-response-{rid[:16]}{home_psi.SUFFIX}"
        if not response_path.exists():
            request_path = exports / c / party / "psi" / f"{party}-request-{rid[:16]}{home_psi.SUFFIX}"
            if not request_path.exists():
                home_psi.write_message(request_path, home_psi.client_request(c, party, client_input.identifiers, pairing_key))
            waiting.append(
                f"{party}: give it {request_path}; it runs `dcr psi respond {c} --party {party} --key KEYFILE --request {request_path.name}` "
                f"at home and puts the answer into {response_path.parent}/"
            )
            continue
        try:
            response = home_psi.read_message(response_path, "response", c, party, request_id=rid)
            out.append(home_psi.complete(setup, response, pairing_key, len(client_input.identifiers)))
        except home_psi.MessageError as exc:
            raise dg.Failure(f"PSI message refused, previous cross-reference kept: {exc}") from None
    if waiting:
        raise dg.Failure("waiting for the PSI answer of a party that keeps its identifiers at home (previous cross-reference kept). " + "; ".join(waiting))
    return out


def _cross_reference_asset(loaded: LoadedCollaboration, landing: Path, exports: Path) -> dg.AssetsDefinition:
    c = loaded.name
    parties = loaded.parties()
    client = loaded.matching_client()
    at_operator = [client] + [p for p in parties if not loaded.at_home(p) and p != client]
    at_home = [p for p in parties if loaded.at_home(p)]
    home_deps = [naming.staging_key(c, ds.owner, name) for name, ds in loaded.collaboration.datasets.items() if ds.owner in at_home]

    bucket_keys = [naming.bucket_key(c, b) for b in range(loaded.collaboration.matching.buckets)] if loaded.collaboration.matching.bucket_steps else []

    @dg.asset(
        key=naming.cross_reference_key(c),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator] + [dg.AssetKey(k) for k in home_deps + bucket_keys],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching"},
        owners=["team:operator"],
        description=f"Private set intersection (openmined-psi) of {', '.join(parties)}'s identifiers: "
        f"one random match_id per shared person with each party's token. {client} acts as PSI client."
        + (f" {', '.join(at_home)} keep their identifiers at home and answer with `dcr psi` message files." if at_home else ""),
    )
    def cross_reference(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> dg.MaterializeResult:
        with advisory_lock(warehouse.url, f"dcr-matching:{c}"):  # two runs at once: the second finds the identities matched
            return _cross_reference(context, warehouse, secrets)

    def _cross_reference(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> dg.MaterializeResult:
        inputs = store_matching.read_identities(warehouse.url, loaded, at_operator)
        setups = _home_inputs(loaded, landing)
        buckets = loaded.collaboration.matching.buckets
        digest = matching.input_digest(inputs, client, buckets, [m.sha256 for m in setups.values()])
        with warehouse.connect() as conn:
            previous = store_matching.previous_match(conn, c)
        input_rows = {**{f"input_rows_{inp.party}": dg.MetadataValue.int(len(inp.tokens)) for inp in inputs},
                      **{f"input_rows_{p}": dg.MetadataValue.int(len(m.tokens)) for p, m in setups.items()}}
        if previous is not None and previous[0] == digest:
            context.log.info("identities unchanged since the last match: no PSI work, cross-reference and match_ids kept")
            return dg.MaterializeResult(
                metadata={"recomputed": False, "matched": dg.MetadataValue.int(previous[1]), "input_digest": digest,
                          **input_rows, "policy_sha256": loaded.policy_sha256},
                data_version=dg.DataVersion(digest),
            )
        client_input = next(inp for inp in inputs if inp.party == client)
        home = _home_matches(loaded, setups, client_input, secrets.pairing_key(c), landing, exports)
        if loaded.collaboration.matching.bucket_steps:
            with warehouse.connect() as conn:
                result = _assemble_buckets(conn, loaded, inputs, home)
        else:
            result = matching.match(inputs, client, buckets=buckets, padding=loaded.collaboration.matching.padding, home=home)
        with warehouse.connect() as conn:
            store_matching.write_cross_reference(conn, c, result, digest, client)
            overlap = _release_overlap(context, conn, loaded, result.matched, digest)
        context.log.info(f"matched {result.matched} people across {len(parties)} parties")
        return dg.MaterializeResult(
            metadata={
                **input_rows,
                **overlap,
                "matched": dg.MetadataValue.int(result.matched),
                "cross_reference_rows": dg.MetadataValue.int(len(result.rows)),
                "recomputed": True,
                "input_digest": digest,
                "psi_client": client,
                "buckets": buckets,
                "home_parties": ", ".join(at_home) or "none",
                "bytes_exchanged": dg.MetadataValue.int(result.bytes_exchanged),
                "policy_sha256": loaded.policy_sha256,
            },
            data_version=dg.DataVersion(digest),
        )

    return cross_reference


def _release_overlap(context: dg.AssetExecutionContext, conn: Any, loaded: LoadedCollaboration, matched: int, digest: str) -> dict[str, Any]:
    """What the members learn of the overlap: nothing, or a DP count charged to the overlap account (withheld once it is spent)."""
    spec = loaded.collaboration.matching
    if spec.overlap_release == "withheld":
        return {"overlap_release": "withheld"}
    try:
        stored = release_overlap(conn, loaded, matched, digest, run_id=context.run.run_id)
    except ledger.BudgetExhausted as exc:
        context.log.warning(f"overlap withheld: {exc}")
        return {"overlap_release": "withheld: the overlap budget is spent"}
    if spec.overlap_release == "exact":
        return {"overlap_release": "exact", "overlap_release_id": stored.release_id, **_audit_metadata(stored)}
    return {"overlap_release": "dp", "overlap_release_id": stored.release_id, "overlap_epsilon_charged": 0.0 if stored.cached else stored.epsilon,
            "overlap_epsilon_remaining": stored.budget.remaining, **_audit_metadata(stored)}


def _audit_metadata(stored: ledger.StoredRelease) -> dict[str, Any]:
    """A release's audit-chain entry, as the event log keeps it (`dcr audit --verify` compares the two)."""
    return audit_metadata(stored.audit)


def audit_metadata(audit: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "audit_entry": dg.MetadataValue.json(audit.get("entry", {})),
        "audit_entry_sha256": audit.get("entry_sha256", ""),
        "audit_chain_sha256": audit.get("chain_sha256", ""),
        "audit_seq": audit.get("seq", 0),
        **({"audit_head": dg.MetadataValue.json(audit["head"])} if audit.get("head") else {}),
    }


def _release_asset(loaded: LoadedCollaboration, query_name: str, exports: Path, manifest: Mapping[str, Any]) -> dg.AssetsDefinition:
    c = loaded.name
    query = loaded.queries[query_name]
    spec = query.spec
    translator = CollaborationTranslator()
    model = naming.query_model(c, query_name)
    mechanism = f"differentially private (opendp, epsilon {spec.privacy.epsilon})" if spec.privacy else f"thresholded (groups under {spec.min_distinct_units} people removed, no noise)"

    @dg.asset(
        key=naming.release_key(c, query_name),
        deps=[dg.AssetKey(naming.analysis_key(c, query_name))],
        group_name=c,
        kinds={"postgres", "opendp" if spec.rule == "dp" else "python"},
        tags={"dcr/stage": "results", "dcr/consumer": spec.consumer, "dcr/release": spec.release},
        owners=[f"team:{spec.consumer}"],
        description=f"Release of {query_name}, {mechanism}, for {', '.join(spec.receivers)}"
        + (f"; charged to {spec.consumer}'s budget" if spec.rule == "dp" else "")
        + f". Only on request (config: params){' or by a schedule' if spec.release == 'scheduled' else ''}. {spec.description or ''}",
    )
    def release(context: dg.AssetExecutionContext, config: ReleaseConfig, warehouse: WarehouseResource, dbt: DbtCliResource) -> dg.MaterializeResult:
        try:
            params = validate_params(query, config.params)
        except ParameterError as exc:
            raise dg.Failure(f"release refused, nothing ran: {exc}") from None
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
                except (ledger.BudgetExhausted, ReleaseRefused) as exc:
                    raise dg.Failure(f"release refused: {exc}") from None
                except ledger.ReleaseFailed as exc:
                    raise dg.Failure(str(exc)) from None
        status = stored.budget
        context.log.info(
            f"{query_name}: release {stored.release_id} {'(stored result, no charge)' if stored.cached else f'charged epsilon {stored.epsilon:.4g}'}; "
            f"{spec.consumer} has {status.remaining:.4g} of {status.total:.4g} left"
        )
        return dg.MaterializeResult(
            metadata={
                "release_id": stored.release_id,
                "cached": stored.cached,
                "epsilon_charged": 0.0 if stored.cached else stored.epsilon,
                "epsilon_of_release": stored.epsilon,
                "epsilon_remaining": status.remaining,
                "epsilon_budget": status.total,
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
                **({"withheld_groups": dg.MetadataValue.int(len(stored.withheld)), "withheld_because": dg.MetadataValue.json(sorted(set(stored.withheld)))}
                   if spec.rule == "threshold" and not stored.cached else {}),
                **_audit_metadata(stored),
                "exports": ", ".join(f"{r}/{query_name}/{stored.release_id}.csv|parquet" for r in spec.receivers),
            }
        )

    return release


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
        description=f"Ad-hoc SQL of a member with the run_queries ability, checked against the analysis rules of "
        f"{', '.join(open_datasets) or 'no dataset (none allows ad-hoc SQL)'}, rewritten onto the matched views and thresholded; "
        "each run stores its rows for its runner only. Refusals fail the run and name the rule. Run with `dcr query run`.",
    )
    def ad_hoc(context: dg.AssetExecutionContext, config: AdHocConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
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
            raise dg.Failure(
                f"query refused: {exc}",
                metadata={"runner": config.runner, "rule": exc.rule, "query_sha256": digest, "query": adhoc.hashable(config.sql),
                          "datasets": ", ".join(adhoc.datasets_named(loaded, config.sql)), "audit_chain_sha256": chained.chain_sha256},
            ) from None
        context.log.info(
            f"ad-hoc query of {config.runner}: {len(result.rows)} rows released (threshold {checked.min_distinct_units}"
            + (f"; {result.suppressed} withheld by the difference check)" if result.suppressed else ")")
        )
        return dg.MaterializeResult(
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


def _grants_asset(loaded: LoadedCollaboration) -> dg.AssetsDefinition:
    c = loaded.name

    @dg.asset(
        key=naming.grants_key(c),
        group_name=c,
        kinds={"postgres"},
        tags={"dcr/stage": "access"},
        owners=["team:operator"],
        description=f"Schemas, least-privilege roles and grants of {c}, derived from the policy and applied idempotently "
        "(per party: raw owner, staging loader, result reader; shared: matching, analysis builder, query runner, admin).",
    )
    def grants(warehouse: WarehouseResource) -> dg.MaterializeResult:
        with warehouse.connect() as conn:
            count = access.apply(conn, loaded)
            # Each policy version the pipeline applies is in the audit chain.
            chained = audit_chain.record_policy(conn, naming.results_schema(c), c, loaded.policy_sha256,
                                                {q: query.sha256 for q, query in loaded.queries.items()})
        return dg.MaterializeResult(
            metadata={"roles": ", ".join(access.roles(loaded)), "grants": dg.MetadataValue.int(count), "policy_sha256": loaded.policy_sha256,
                      "audit_chain_sha256": chained.chain_sha256 if chained else ""}
        )

    return grants


def pipeline_selection(collab: str) -> dg.AssetSelection:
    """A collaboration's pipeline up to the pre-noise tables: all of its group but releases and ad-hoc queries,
    which spend budget or hand out results and so run only when someone asks."""
    return dg.AssetSelection.groups(collab) - dg.AssetSelection.tag("dcr/stage", "results") - dg.AssetSelection.tag("dcr/stage", "ad_hoc")


def scheduled_releases(loaded: LoadedCollaboration) -> dg.AssetSelection:
    """The releases whose query opts into schedules (`release: scheduled`)."""
    keys = [dg.AssetKey(naming.release_key(loaded.name, q)) for q, query in loaded.queries.items() if query.spec.release == "scheduled"]
    return dg.AssetSelection.assets(*keys) if keys else dg.AssetSelection.assets()


def _schedules(loaded: LoadedCollaboration) -> list[dg.ScheduleDefinition]:
    """The schedules the policy declares (created stopped; turn them on in the UI)."""
    c = loaded.name
    stages = {"matching": ("private", "staging", "matching"), "queries": ("analysis", "results")}
    out = []
    for schedule in loaded.collaboration.schedules:
        selection = pipeline_selection(c)
        if schedule.target != "all":
            selection = pipeline_selection(c) & dg.AssetSelection.tag("dcr/stage", stages[schedule.target][0])
            for stage in stages[schedule.target][1:]:
                selection = selection | (pipeline_selection(c) & dg.AssetSelection.tag("dcr/stage", stage))
        if schedule.target != "matching":
            selection = selection | scheduled_releases(loaded)  # default parameters; only queries that opt in
        out.append(
            dg.ScheduleDefinition(
                name=f"{c}__{schedule.name}",
                cron_schedule=schedule.cron,
                target=selection,
                description=f"Declared in policies/{c}/collaboration.yaml: {schedule.target} at '{schedule.cron}'.",
            )
        )
    return out


def _policy_sensor(loaded: LoadedCollaboration) -> dg.SensorDefinition:
    """Watches the collaboration's policy folder: reports a change or a mistake, re-applies grants after a reload."""
    c = loaded.name
    folder = loaded.folder

    @dg.sensor(
        name=f"{c}__policy_changes",
        asset_selection=[dg.AssetKey(naming.grants_key(c))],
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
        yield dg.RunRequest(run_key=f"policy:{loaded.policy_sha256}", tags={"dcr/collaboration": c, "dcr/policy": loaded.policy_sha256[:12]})

    return policy_sensor


def build_collaboration(loaded: LoadedCollaboration, manifest: Mapping[str, Any], landing: Path, exports: Path, dbt_project: Path) -> dg.Definitions:
    """Every asset and the run-everything job of one collaboration."""
    c = loaded.name
    assets: list[dg.AssetsDefinition] = [_grants_asset(loaded)]
    assets += [_ingest_asset(loaded, name, landing) for name in loaded.collaboration.datasets]
    assets.append(_dbt_stage(loaded, manifest, "staging", dbt_project))
    if loaded.collaboration.matching.bucket_steps:
        assets.extend(_bucket_asset(loaded, b) for b in range(loaded.collaboration.matching.buckets))
    assets.append(_cross_reference_asset(loaded, landing, exports))
    assets.append(_dbt_stage(loaded, manifest, "analysis", dbt_project))
    assets.extend(_release_asset(loaded, q, exports, manifest) for q in loaded.queries)
    assets.append(_ad_hoc_asset(loaded))
    job = dg.define_asset_job(f"{c}__all", selection=pipeline_selection(c), description=f"Materialize collaboration {c} end to end.")
    return dg.Definitions(
        assets=assets, jobs=[job], sensors=[_landing_sensor(loaded, landing), _policy_sensor(loaded)], schedules=_schedules(loaded)
    )
