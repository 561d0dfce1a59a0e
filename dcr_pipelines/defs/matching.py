"""Matching: the cross-reference asset and the optional bucket steps, as adapters over services/matching.py."""

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..services import matching as service
from .ad_hoc import tag_outcome
from .common import _audit_metadata
from .resources import SecretsResource, WarehouseResource


def _matching_code_version(loaded: LoadedCollaboration) -> str:
    """What decides the matching besides its inputs: the identity kind and the matching spec of the policy."""
    spec = loaded.collaboration.identity.model_dump_json() + loaded.collaboration.matching.model_dump_json()
    if loaded.graph_matching():  # the sets of parties that get a cross-reference
        spec += repr(loaded.overlaps())
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _bucket_asset(loaded: LoadedCollaboration, bucket: int) -> dg.AssetsDefinition:
    """One hash bucket of the PSI as its own step, so a distributed executor can run buckets on different workers."""
    c, at_operator, buckets = loaded.name, service.at_operator(loaded), loaded.collaboration.matching.buckets

    @dg.asset(
        key=naming.bucket_key(c, bucket),
        code_version=_matching_code_version(loaded),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching", "dcr/bucket": str(bucket)},
        owners=["team:operator"],
        description=f"PSI of bucket {bucket} of {buckets} ({', '.join(at_operator)}): the matched people's tokens, no match_id yet. "
        "Each bucket is its own step (matching.bucket_steps), so Celery or Kubernetes workers can share them.",
    )
    def bucket_step(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        try:
            done = service.bucket_step(loaded, bucket, url=warehouse.url, connect=warehouse.connect, log=context.log)
        except service.MatchingFailed as exc:
            raise dg.Failure(str(exc)) from None
        return dg.MaterializeResult(metadata=done.metadata, data_version=dg.DataVersion(done.digest))

    return bucket_step


def _cross_reference_asset(loaded: LoadedCollaboration, landing: Path, exports: Path) -> dg.AssetsDefinition:
    c = loaded.name
    parties = loaded.parties()
    client, at_operator = loaded.matching_client(), service.at_operator(loaded)
    at_home = [p for p in parties if loaded.at_home(p)]
    home_deps = [naming.staging_key(c, name) for name, ds in loaded.collaboration.datasets.items() if ds.owner in at_home]

    bucket_keys = [naming.bucket_key(c, b) for b in range(loaded.collaboration.matching.buckets)] if loaded.collaboration.matching.bucket_steps else []

    @dg.asset(
        key=naming.cross_reference_key(c),
        code_version=_matching_code_version(loaded),
        deps=[dg.AssetKey(naming.identities_key(c, p)) for p in at_operator] + [dg.AssetKey(k) for k in home_deps + bucket_keys],
        group_name=c,
        kinds={"postgres", "python"},
        tags={"dcr/stage": "matching"},
        owners=["team:operator"],
        output_required=False,  # waiting for a home party's answer materializes nothing, and is not a failure
        description=f"Private set intersection (openmined-psi) of {', '.join(parties)}'s identifiers: "
        f"one random match_id per shared person with each party's token. {client} acts as PSI client."
        + (f" {', '.join(at_home)} keep their identifiers at home and answer with `dcr psi` message files." if at_home else ""),
    )
    def cross_reference(context: dg.AssetExecutionContext, warehouse: WarehouseResource, secrets: SecretsResource) -> Iterator[Any]:
        try:
            done = service.cross_reference(loaded, url=warehouse.url, connect=warehouse.connect, pairing_key=lambda: secrets.pairing_key(c),
                                           landing=landing, exports=exports, run_id=context.run.run_id, log=context.log)
        except service.WaitingForParty as wait:
            context.log.info(f"{wait} The {c}__psi_answers sensor launches the pipeline when the file lands.")
            tag_outcome(context, "waiting")
            yield dg.AssetObservation(asset_key=context.asset_key, description=str(wait),
                                      metadata={"outcome": "waiting", "message": str(wait), "waiting_for": ", ".join(wait.parties)})
            return
        except service.MatchingFailed as exc:
            raise dg.Failure(str(exc)) from None
        audit = _audit_metadata(done.overlap_release) if done.overlap_release is not None else {}
        yield dg.MaterializeResult(metadata={**done.metadata, **audit}, data_version=dg.DataVersion(done.digest))

    return cross_reference
