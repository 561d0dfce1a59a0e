"""Uploads: one ingest asset per dataset (validated, swapped in atomically) and the landing-folder sensor."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import naming
from ..lib.database import advisory_lock
from ..lib.policy import LoadedCollaboration
from ..services import ingest as ingest_lib
from .common import IGNORED_PREFIXES, UPLOAD_CHECK, UploadConfig, landing_files, landing_folder
from .resources import WarehouseResource


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
