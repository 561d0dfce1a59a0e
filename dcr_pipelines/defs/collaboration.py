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
from .ad_hoc import _ad_hoc_asset
from .automation import _budget_sensor, _policy_sensor, _psi_answer_sensor, _schedules, collaboration_jobs
from .common import audit_metadata, landing_folder  # noqa: F401 (used by the CLI and the audit trail)
from .dbt_stages import _dbt_stage
from .ingest import _ingest_asset, _landing_sensor
from .matching import _bucket_asset, _cross_reference_asset
from .member_requests import request_sensor
from .release import _release_asset


def build_collaboration(loaded: LoadedCollaboration, manifest: Mapping[str, Any], landing: Path, exports: Path, dbt_project: Path) -> dg.Definitions:
    """Every asset, job, schedule and sensor of one collaboration."""
    assets: list[dg.AssetsDefinition] = [_grants_asset(loaded)]
    assets += [_ingest_asset(loaded, name, landing) for name in loaded.collaboration.datasets]
    stages = [_dbt_stage(loaded, manifest, "staging", dbt_project)]  # what follows ingest, up to the pre-noise tables
    if loaded.collaboration.matching.bucket_steps:
        stages.extend(_bucket_asset(loaded, b) for b in range(loaded.collaboration.matching.buckets))
    stages.append(_cross_reference_asset(loaded, landing, exports))
    stages.append(_dbt_stage(loaded, manifest, "analysis", dbt_project))
    assets += stages
    assets.extend(_release_asset(loaded, q, exports, lambda: (dbt_project, manifest)) for q in loaded.queries)
    assets.append(_ad_hoc_asset(loaded))
    jobs = {job.name: job for job in collaboration_jobs(loaded)}
    downstream = [assets[0].key, *sorted({k for a in stages for k in a.keys})]  # the grants too: cheap, and the stages rely on them
    sensors = [_landing_sensor(loaded, landing, jobs, downstream), _policy_sensor(loaded), _budget_sensor(loaded),
               request_sensor(loaded, list(jobs.values()), landing)]
    if loaded.collaboration.matching.home_parties:
        sensors.append(_psi_answer_sensor(loaded, landing))
    return dg.Definitions(assets=assets, jobs=list(jobs.values()), sensors=sensors, schedules=_schedules(loaded))
