"""Uploads: one ingest asset per dataset (the queue's consumer) and the landing-folder sensor.

A replace-mode dataset is one asset: each run claims the inbox, decides every
waiting upload and materializes the current version. An append-mode dataset
is partitioned by upload (dynamic partitions ``upload-<seq>``): each accepted
file is a partition, so the UI shows which file produced which rows, and a
backfill of a partition re-processes that file. Downstream stages read the
union of the accepted files.
"""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import naming
from ..lib.naming import job_names, uploads_job_name
from ..lib.policy import LoadedCollaboration
from ..services import ingest as ingest_lib
from ..services import ingest_run
from ..store import uploads as queue
from .common import PARTY_METADATA, UPLOAD_CHECK, UploadConfig
from .resources import WarehouseResource

UPLOADS_CHECK = "uploads_accepted"


def partitions_name(collab: str, party: str, dataset: str) -> str:
    return f"{collab}__{party}__{dataset}__uploads"


def target(loaded: LoadedCollaboration, dataset_name: str, landing: Path, url: str) -> ingest_lib.Target:
    ds = loaded.collaboration.datasets[dataset_name]
    return ingest_lib.Target(loaded.name, ds.owner, dataset_name, ds, naming.raw_schema(loaded.name, ds.owner), landing, url,
                             tokenised=loaded.at_home(ds.owner), phone_region=loaded.collaboration.identity.phone_default_country)


def _check(name: str, check: ingest_run.Check) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=check.passed, description=check.description, metadata=check.metadata,
                               severity=dg.AssetCheckSeverity.WARN if check.warn else dg.AssetCheckSeverity.ERROR)


def _ingest_asset(loaded: LoadedCollaboration, dataset_name: str, landing: Path) -> dg.AssetsDefinition:
    c = loaded.name
    ds = loaded.collaboration.datasets[dataset_name]
    party = ds.owner
    key = dg.AssetKey(naming.raw_key(c, dataset_name))
    folder = landing / c / party / dataset_name
    append = ds.mode == "append"
    partitions = dg.DynamicPartitionsDefinition(name=partitions_name(c, party, dataset_name)) if append else None

    @dg.asset(
        key=key,
        code_version=hashlib.sha256(ds.model_dump_json().encode()).hexdigest()[:16],  # the contract: a changed one re-checks the data
        deps=[dg.AssetKey(naming.grants_key(c))],
        group_name=c,
        kinds={"postgres", ds.format.type},
        tags={"dcr/stage": "raw", "dcr/party": party, "dcr/upload-mode": ds.mode},
        owners=[f"team:{party}"],
        partitions_def=partitions,
        check_specs=[
            dg.AssetCheckSpec(UPLOAD_CHECK, asset=key, blocking=True,
                              description="The current version meets the dataset's contract (great-expectations), the changed contract included."),
            dg.AssetCheckSpec(UPLOADS_CHECK, asset=key, blocking=False,
                              description="Every upload this run decided was accepted (a refused one is quarantined with a report; a warning)."),
        ],
        description=f"{party}'s uploads of {dataset_name} ({ds.mode} mode): each file is claimed from the landing folder {folder}, "
        f"validated against its contract with great-expectations and swapped in atomically as a new version of "
        f"{naming.raw_schema(c, party)}.{dataset_name}. " + (ds.description or ""),
    )
    def ingest(context: dg.AssetExecutionContext, config: UploadConfig, warehouse: WarehouseResource) -> Iterator[Any]:
        asked_for = ingest_run.Run(config.path, config.upload, context.partition_key if append else None, loaded.policy_sha256,
                                   lambda keys: context.instance.add_dynamic_partitions(partitions_name(c, party, dataset_name), keys))
        try:
            done = ingest_run.run(warehouse.connect, target(loaded, dataset_name, landing, warehouse.url), asked_for, context.log)
        except ingest_run.IngestFailed as exc:
            if exc.contract is not None:
                yield _check(UPLOAD_CHECK, exc.contract)
            raise dg.Failure(str(exc), metadata={**exc.metadata, PARTY_METADATA: party}) from None
        yield dg.MaterializeResult(metadata={**done.metadata, PARTY_METADATA: party}, check_results=[_check(UPLOAD_CHECK, done.contract), _check(UPLOADS_CHECK, done.clean)],
                                   data_version=dg.DataVersion(done.checksum))

    return ingest


def _landing_sensor(loaded: LoadedCollaboration, landing: Path, jobs_by_name: dict[str, Any], downstream: list[dg.AssetKey]) -> dg.SensorDefinition:
    """Files in a dataset's landing folder launch its ingest: one run per replace-mode dataset, one per appended file.

    Then freshness: on a tick with no new file and no upload waiting, if a dataset's current version is not what its
    staging table was built from (a new upload, a withdraw), one run of ``downstream`` (staging, matching, analysis;
    never a release) brings the staged data up to date, once per set of current versions (the run key). Stages with
    nothing changed skip themselves. Until it has run, releases and ad-hoc queries refuse with "stale data"."""
    c = loaded.name
    pipeline = job_names(c)["pipeline"]
    targets = sorted({pipeline if ds.mode == "replace" else uploads_job_name(c, ds.owner, name) for name, ds in loaded.collaboration.datasets.items()})
    jobs = [jobs_by_name[name] for name in targets]

    @dg.sensor(
        name=f"{c}__landing_files",
        jobs=jobs,
        minimum_interval_seconds=30,
        description=f"Claims each new file under {landing / c}/<party>/<dataset>/ into the upload queue and launches its ingest; "
        "once nothing waits, refreshes staging, matching and analysis when the staged data are not the current uploads (never a release).",
    )
    def landing_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult | dg.SkipReason:
        declared = {(ds.owner, name) for name, ds in loaded.collaboration.datasets.items()}
        for party_dir in sorted(p for p in (landing / c).glob("*") if p.is_dir() and not p.name.startswith(ingest_lib.IGNORED_PREFIXES)):
            for dataset_dir in sorted(p for p in party_dir.glob("*") if p.is_dir() and not p.name.startswith(ingest_lib.IGNORED_PREFIXES)):
                if (party_dir.name, dataset_dir.name) not in declared:
                    context.log.warning(f"{dataset_dir}: {c} declares no dataset {dataset_dir.name!r} of {party_dir.name!r}; files there are ignored")
        requests: list[dg.RunRequest] = []
        partitions: list[dg.AddDynamicPartitionsRequest] = []
        for name, ds in loaded.collaboration.datasets.items():
            t = target(loaded, name, landing, warehouse.url)
            key = dg.AssetKey(naming.raw_key(c, name))
            with warehouse.connect() as conn:
                waiting = ingest_lib.intake(conn, t)
            if not waiting:
                continue
            if ds.mode == "append":
                partitions.append(dg.AddDynamicPartitionsRequest(partitions_name(c, ds.owner, name), [u.partition_key for u in waiting]))
                requests += [dg.RunRequest(run_key=u.partition_key, job_name=uploads_job_name(c, ds.owner, name), asset_selection=[key],
                                           partition_key=u.partition_key, tags={"dcr/upload": u.file_name, "dcr/collaboration": c})
                             for u in waiting]
            else:
                newest = waiting[-1]
                requests.append(dg.RunRequest(run_key=f"{c}/{name}/{newest.seq}", job_name=pipeline, asset_selection=[key],
                                              tags={"dcr/upload": newest.file_name, "dcr/collaboration": c}))
        if requests:
            return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partitions)
        return _refresh(context, loaded, warehouse, landing, downstream)

    return landing_sensor


def _refresh(context: dg.SensorEvaluationContext, loaded: LoadedCollaboration, warehouse: WarehouseResource, landing: Path,
             downstream: list[dg.AssetKey]) -> dg.SensorResult | dg.SkipReason:
    """A run of the stages after ingest when the staged data are not the current uploads (Dagster's data versions: the
    raw asset's latest against what staging's provenance says it read), and nothing is waiting."""
    from . import freshness

    c = loaded.name
    with warehouse.connect() as conn:
        if queue.listing(conn, c, states=("queued", "processing")):
            return dg.SkipReason("no new upload files; uploads are still being ingested (the stages follow once they are in)")
        for k in freshness.record_missing(context.instance, conn, loaded, landing):
            context.log.warning(f"{k}: the warehouse's current version was missing from the event log (a command stopped before recording it); recorded now")
        staged = freshness.staged(context.instance, conn, loaded)
    missing = sorted(f"{ds.owner}.{name}" for name, ds in loaded.collaboration.datasets.items() if f"{ds.owner}.{name}" not in staged.warehouse)
    if missing:
        return dg.SkipReason(f"no new upload files; waiting for a first upload of {', '.join(missing)} before staging")
    if not staged.stale:
        return dg.SkipReason("no new upload files; the staged data are the current uploads")
    state = hashlib.sha256(json.dumps(staged.recorded, sort_keys=True).encode()).hexdigest()[:16]
    return dg.SensorResult(run_requests=[dg.RunRequest(
        run_key=f"refresh:{state}", job_name=job_names(c)["pipeline"], asset_selection=downstream,
        tags={"dcr/collaboration": c, "dcr/refresh": ", ".join(staged.stale), "dcr/user": f"sensor {c}__landing_files"})])
