"""Staleness from Dagster's own data versions: what the staged data were built from, read from the event log.

Every raw (upload) asset event carries a data version, the content checksum of the dataset's current version: an
ingest materialization (each appended file's partition carries the whole dataset's checksum), and a withdraw's
runless materialization. Every staging materialization carries Dagster's provenance: the storage id and data
version of the raw event it was built from. So, per dataset:

- **read**: the data version of the raw event staging's latest materialization points at;
- **recorded**: the raw asset's latest data version (any partition);
- stale when they differ. The same content again (a backfill of the same file) is the same data version: not stale.

The warehouse's ``dcr_meta.dataset_versions`` is only a consistency check: a version the warehouse holds but the
event log has not recorded (a command that changed it died before its event) is stale too, until
:func:`record_missing` records it (``dcr run`` and the landing sensor do).

Dagster's ``CachingStaleStatusResolver`` is not used for this gate: it skips partitioned dependencies with 100 or more
partitions (an append dataset with 100 uploads would always look fresh) and it cannot see a withdraw. The rule here is
the resolver's rule for a partitioned dependency (a newer event with a different data version than the one read),
applied to the whole raw asset.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import (
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    extract_data_provenance_from_entry,
    extract_data_version_from_entry,
)

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..services import ingest as ingest_lib
from .common import PARTY_METADATA


def _version(record: Any) -> str | None:
    if record is None:
        return None
    version = extract_data_version_from_entry(record.event_log_entry)
    return version.value if version is not None else None


def read_by_staging(instance: dg.DagsterInstance, collab: str, dataset: str) -> str | None:
    """The data version of the raw event the dataset's staged table was built from: the raw event its latest
    normalised materialization points at, provided the latest staging materialization was built from that one (None:
    never staged, or staging not rebuilt since)."""
    raw = dg.AssetKey(naming.raw_key(collab, dataset))
    normalised = dg.AssetKey(naming.normalised_key(collab, dataset))
    pointer = _pointer(instance.get_latest_data_version_record(normalised, False), raw)
    staging = _provenance(instance.get_latest_data_version_record(dg.AssetKey(naming.staging_key(collab, dataset)), False))
    if pointer is None or staging is None or staging.input_storage_ids.get(normalised) != pointer[1]:
        return None
    at = instance.get_latest_data_version_record(raw, False, before_cursor=pointer[0] + 1)
    return _version(at) if at is not None and at.storage_id == pointer[0] else None


def _provenance(record: Any) -> Any:
    return extract_data_provenance_from_entry(record.event_log_entry) if record is not None else None


def _pointer(record: Any, parent: dg.AssetKey) -> tuple[int, int] | None:
    """(storage id of the ``parent`` event ``record`` was built from, ``record``'s own storage id)."""
    provenance = _provenance(record)
    pointer = provenance.input_storage_ids.get(parent) if provenance is not None else None
    return (int(pointer), record.storage_id) if pointer else None


def staged(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration) -> ingest_lib.Staged:
    """Per dataset with a current version: what staging read, what the event log holds, what the warehouse holds."""
    c = loaded.name
    warehouse = {k: str(v["checksum"]) for k, v in ingest_lib.current_versions(conn, c).items()}
    read: dict[str, str | None] = {}
    recorded: dict[str, str | None] = {}
    for name, ds in loaded.collaboration.datasets.items():
        k = f"{ds.owner}.{name}"
        if k not in warehouse:
            continue
        recorded[k] = _version(instance.get_latest_data_version_record(dg.AssetKey(naming.raw_key(c, name)), False))
        read[k] = read_by_staging(instance, c, name)
    return ingest_lib.Staged(read=read, recorded=recorded, warehouse=warehouse)


def record_version(instance: dg.DagsterInstance, collab: str, dataset: str, version: Any, *, party: str, partition: str | None = None,
                   why: str, **metadata: Any) -> None:
    """A runless materialization of the raw asset carrying the dataset's current content as its data version (a
    withdraw, or a version the event log missed): what staging and the release gate compare against."""
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=dg.AssetKey(naming.raw_key(collab, dataset)),
        partition=partition,
        description=why,
        metadata={"version": version.version, "checksum_sha256": version.checksum, "row_count": dg.MetadataValue.int(version.row_count),
                  "files_in_version": len(version.parts), "recorded_because": why, **metadata, PARTY_METADATA: party},
        tags={DATA_VERSION_TAG: version.checksum, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"},
    ))


def record_missing(instance: dg.DagsterInstance, conn: Any, loaded: LoadedCollaboration, landing: Any) -> list[str]:
    """Record, as the raw asset's data version, every current warehouse version the event log does not hold (a command
    that changed it died before its event); returns ``party.dataset`` of each one recorded."""
    from .ingest import partitions_name, target

    c = loaded.name
    now = staged(instance, conn, loaded)
    done = []
    for name, ds in loaded.collaboration.datasets.items():
        k = f"{ds.owner}.{name}"
        if k in now.warehouse and now.recorded.get(k) != now.warehouse[k]:
            version = ingest_lib.current_version(conn, target(loaded, name, landing, ""))
            if version is None:
                continue
            partition = None
            if ds.mode == "append":
                keys = instance.get_dynamic_partitions(partitions_name(c, ds.owner, name))
                if not keys:
                    continue
                partition = keys[-1]
            record_version(instance, c, name, version, party=ds.owner, partition=partition,
                           why="the warehouse's current version, which the event log had not recorded")
            done.append(k)
    return done

