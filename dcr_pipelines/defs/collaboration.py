"""The asset-group factory: one collaboration folder in, one Dagster asset group out.

Stages (keys are ``[collab, stage, name]``):

    raw/<party>__<dataset>        upload -> new version, swapped in atomically
    private/..., staging/...      dbt: normalise identifiers, keyed tokens, secure tables
    matching/cross_reference      PSI between the parties -> random match_id per person
    analysis/...                  dbt: matched views and bounded pre-noise aggregates
    results/<query>               opendp noise, budget charged, result stored
"""


from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib.policy import LoadedCollaboration
from .access import _grants_asset
from .automation import _policy_sensor, _schedules, pipeline_selection
from .common import audit_metadata, landing_folder  # noqa: F401 (used by the CLI and the audit trail)
from .dbt_stages import _dbt_stage
from .ingest import _ingest_asset, _landing_sensor
from .matching import _bucket_asset, _cross_reference_asset
from .release import _ad_hoc_asset, _release_asset


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
