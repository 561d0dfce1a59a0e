"""The audit trail, read from Dagster's event log (no second bookkeeping system).

Entries are the materializations, observations and step failures of a
collaboration's assets, with their metadata and the run's tags (who ran it).
A refused request and a wait for a party are observations (kinds ``refused``
and ``waiting``), not failed runs; ``failed`` entries are real failures.
Release entries are also chained by hash (lib/audit.py); ``verify`` checks
the chain against the releases table.
"""

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib import audit, naming
from ..lib.policy import LoadedCollaboration
from ..store import Connection, access, audit_chain, footprints, ledger
from .common import CONCERNS_METADATA, PARTY_METADATA, party_assets

USER_TAG = "dcr/user"
EXPECTED_OUTCOMES = ("refused", "waiting")  # observations of a refused request or a wait for a party: their own kinds, not failures


def _plain(metadata: Any) -> dict[str, Any]:
    """Metadata as plain JSON values (a table, such as a release's released_values, as a list of rows)."""
    out = {}
    for k, v in (metadata or {}).items():
        value = getattr(v, "value", v)
        out[k] = [dict(r.data) for r in value.records] if isinstance(value, dg.TableMetadataValue) else value
    return out


def touches(loaded: LoadedCollaboration, asset: str, party: str, metadata: dict[str, Any] | None = None) -> bool:
    """Whether an entry about ``asset`` concerns ``party``'s data (what a party may export)."""
    _, stage, name = (asset.split("/") + ["", ""])[:3]
    recorded = (metadata or {}).get(CONCERNS_METADATA)
    if stage in ("analysis", "results") and recorded is not None:  # whom it concerned when it was made (a runner, owners, receivers)
        return party in [p.strip() for p in str(recorded).split(",")]
    # Entries made before that was recorded: by the current policy.
    if stage == "results" and name == "ad_hoc":  # ad-hoc runs, accepted or refused: the runner's, and every owner's whose data it names
        meta = metadata or {}
        named = [d.strip() for d in str(meta.get("datasets", "")).split(",") if d.strip()]
        return meta.get("runner") == party or any(
            d in loaded.collaboration.datasets and loaded.collaboration.datasets[d].owner == party for d in named
        )
    if stage in ("raw", "staging", "private"):
        recorded = (metadata or {}).get(PARTY_METADATA)
        if recorded:  # the owner when the entry was made (a dataset name reused by another party later changes nothing)
            return recorded == party
        owners = party_assets(loaded)  # entries made before the owner was recorded
        if (stage, name) in owners:
            return owners[stage, name] == party
        return name.startswith(f"{party}__")  # history kept under the older keys, <party>__<dataset>__<stage>
    if stage in ("analysis", "results"):
        query = loaded.queries.get(name.removeprefix(naming.PRE_NOISE_LABEL) if stage == "analysis" else name)
        query = query or loaded.queries.get(name.removesuffix("__pre_noise"))  # history kept under the older keys
        datasets = query.datasets if query else ([name.removeprefix(naming.MATCHED_LABEL)] if name.startswith(naming.MATCHED_LABEL) else [])
        return any(loaded.collaboration.datasets[d].owner == party for d in datasets if d in loaded.collaboration.datasets) or (
            query is not None and party in query.spec.receivers
        )
    return True  # grants, matching: every party's data


def entries(instance: dg.DagsterInstance, loaded: LoadedCollaboration, since: dt.datetime | None = None, party: str | None = None) -> list[dict[str, Any]]:
    """Audit entries of a collaboration, oldest first."""
    c = loaded.name
    out: list[dict[str, Any]] = []

    def events(key: dg.AssetKey, kind: str) -> list[tuple[str, Any]]:
        fetch = instance.fetch_materializations if kind == "materialization" else instance.fetch_observations
        found, cursor = [], None
        while True:
            result = fetch(key, limit=500, cursor=cursor, ascending=True)
            found += [(kind, record) for record in result.records]
            if not result.has_more:
                return found
            cursor = result.cursor

    # One query per asset and kind, each on its own connection: run them side by side (I/O, not CPU).
    keys = [(key, kind) for key in instance.get_asset_keys(prefix=[c]) for kind in ("materialization", "observation")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        fetched = [item for batch in pool.map(lambda kk: events(*kk), keys) for item in batch]
    run_ids = sorted({record.run_id for _, record in fetched if record.run_id})
    users = {run.run_id: run.tags.get(USER_TAG, "") for run in instance.get_runs(dg.RunsFilter(run_ids=run_ids))} if run_ids else {}
    for kind, record in fetched:
        event = record.event_log_entry.dagster_event
        data = event.event_specific_data if event else None
        payload = getattr(data, "materialization", None) or getattr(data, "asset_observation", None)
        metadata = _plain(payload.metadata if payload else {})
        out.append({
            "time": dt.datetime.fromtimestamp(record.timestamp, dt.UTC).isoformat(),
            "kind": metadata.get("outcome") if metadata.get("outcome") in EXPECTED_OUTCOMES else kind,
            "asset": (payload.asset_key if payload else record.asset_key).to_user_string(), "run_id": record.run_id,
            "user": users.get(record.run_id, ""), "metadata": metadata,
        })
    for run_record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]), limit=2000):
        for log in instance.all_logs(run_record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            step = log.step_key or ""
            if not step.startswith(f"{c}__"):
                continue
            failure = log.dagster_event.step_failure_data if log.dagster_event else None
            message = (failure.user_failure_data.description if failure and failure.user_failure_data else None) or (
                failure.error.message.strip().splitlines()[-1] if failure and failure.error else "failed"
            )
            details = _plain(failure.user_failure_data.metadata) if failure and failure.user_failure_data else {}
            out.append({
                "time": dt.datetime.fromtimestamp(log.timestamp, dt.UTC).isoformat(), "kind": "failed",
                "asset": step.replace("__", "/", 2), "run_id": log.run_id, "user": run_record.dagster_run.tags.get(USER_TAG, ""),
                "metadata": {"message": message, **details},
            })
    if since is not None:
        out = [e for e in out if dt.datetime.fromisoformat(e["time"]) >= since]
    if party is not None:
        out = [redact(loaded, e, party) for e in out if touches(loaded, e["asset"], party, e["metadata"])]
    return sorted(out, key=lambda e: e["time"])


MATCHING_COUNTS = ("matched", "matched_all", "cross_reference_rows")  # the all-party overlap: seen where the policy releases it exactly
# grow with every party's input size (identities blinded: every party's identities in a new key epoch, then their new ones)
OPERATOR_ONLY = ("bytes_exchanged", "psi_jobs", "identities_blinded", "scalar_multiplications", "work_buckets")


def redact(loaded: LoadedCollaboration, entry: dict[str, Any], party: str) -> dict[str, Any]:
    """An entry as ``party`` may see it: no other party's row or record counts, the exact all-party overlap only where
    the policy releases it, and never the overlap of some of the parties (``matched__<party>__<party>``) or a pair's
    links per identifier kind (``linked_<party>_<party>_<kind>``)."""
    meta = entry["metadata"]
    exact = loaded.collaboration.matching.overlap_release == "exact"

    def shown(key: str) -> bool:
        for prefix in ("input_rows_", "input_records_"):
            if key.startswith(prefix):
                return key == f"{prefix}{party}"
        if key in MATCHING_COUNTS:
            return exact
        return not (key in OPERATOR_ONLY or key.startswith(("matched__", "linked_")))

    kept = {k: v for k, v in meta.items() if shown(k)}
    return {**entry, "metadata": kept} if len(kept) != len(meta) else entry


def release_events(instance: dg.DagsterInstance, loaded: LoadedCollaboration) -> Iterator[dict[str, Any]]:
    """The audit entry of every release materialization, as recorded in the event log."""
    keys = [naming.release_key(loaded.name, name) for name in loaded.queries] + [naming.cross_reference_key(loaded.name)]  # + the overlap release
    keys.append(naming.ad_hoc_key(loaded.name))  # + differentially private ad-hoc answers
    for path in keys:
        key = dg.AssetKey(path)
        cursor = None
        while True:
            result = instance.fetch_materializations(key, limit=500, cursor=cursor, ascending=True)
            for record in result.records:
                meta = _plain(record.asset_materialization.metadata if record.asset_materialization else {})
                entry = meta.get("audit_entry")
                if isinstance(entry, dict) and entry.get("release_id"):
                    yield {"release_id": entry["release_id"], "audit_entry": entry, "audit_entry_sha256": meta.get("audit_entry_sha256"),
                           "audit_chain_sha256": meta.get("audit_chain_sha256")}
            if not result.has_more:
                break
            cursor = result.cursor


def reconcile(instance: dg.DagsterInstance, conn: Connection, loaded: LoadedCollaboration, export_dir: Path) -> tuple[list[str], list[str]]:
    """Give a committed release whose run died before it wrote its Dagster event that event, marked recovered, and the
    export files its run did not write. Returns (releases whose event was recovered, releases whose files were written).

    Only a release whose run failed or was cancelled (a killed run is marked failed by the next command) is recovered:
    a successful run wrote its event, so a missing one was deleted, and ``verify`` reports it; a run still going is
    still writing its own. (The next command after a killed run writes its files too, when it
    sees the run's process gone; a release whose commit landed just after that look is caught here.)
    """
    from ..services.release import export_missing
    from .collaboration import audit_metadata

    schema = naming.results_schema(loaded.name)
    logged = {e["release_id"] for e in release_events(instance, loaded)}
    recovered = []
    unfinished = []
    releases = [row for row in audit_chain.chain(conn, schema) if row.kind == "release"]
    run_ids = sorted({str(row.entry["run_id"]) for row in releases if row.entry.get("run_id")})
    stopped: set[str] = set()
    for i in range(0, len(run_ids), 500):  # one query per 500 releases, not one per release
        stopped |= {run.run_id for run in instance.get_runs(dg.RunsFilter(
            run_ids=run_ids[i:i + 500], statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]))}
    for row in releases:
        run_id = row.entry.get("run_id")
        if run_id not in stopped:
            continue  # succeeded (it recorded both), or still running (it is writing them): not ours to finish
        unfinished.append(row)
        if row.ref in logged:
            continue
        query = row.entry.get("query_name", "")
        key = (naming.cross_reference_key(loaded.name) if query == access.OVERLAP
               else naming.ad_hoc_key(loaded.name) if query.startswith("ad_hoc__") else naming.release_key(loaded.name, query))
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=key,
            description=f"recovered: release {row.ref} was committed by run {run_id}, which stopped before it could record this event",
            metadata={**audit_metadata({"entry": row.entry, "entry_sha256": row.entry_sha256, "chain_sha256": row.chain_sha256, "seq": row.seq}),
                      "release_id": row.ref, "recovered": True, "recovered_from_run": run_id},
        ))
        recovered.append(row.ref)
    return recovered, export_missing(conn, loaded, unfinished, export_dir)


def verify(instance: dg.DagsterInstance, conn: Connection, loaded: LoadedCollaboration, anchors: list[audit.Anchor] | None = None) -> list[audit.Problem]:
    """Every problem: the chain's links and anchors, the tables users read against it, its mirror in the event log."""
    schema = naming.results_schema(loaded.name)
    ledger.ensure_tables(conn, schema)
    chain = audit_chain.chain(conn, schema)
    return [
        *audit.verify_chain(chain, anchors or []),
        *audit.verify_tables(chain, evidence(conn, loaded)),
        *audit.verify_events(chain, release_events(instance, loaded)),
        *audit.verify_referenced(chain, chain_references(instance, loaded)),
        *audit.verify_runs(chain, stored_runs(instance, [str(r.entry["run_id"]) for r in chain if r.entry.get("run_id")])),
    ]


def stored_runs(instance: dg.DagsterInstance, run_ids: list[str]) -> set[str]:
    """Which of ``run_ids`` the instance's run storage holds."""
    found: set[str] = set()
    for start in range(0, len(run_ids), 500):
        batch = run_ids[start:start + 500]
        found |= {r.dagster_run.run_id for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=batch))}
    return found


def evidence(conn: Connection, loaded: LoadedCollaboration) -> audit.Evidence:
    """The tables users read and the people sets the difference checks keep, as they are now."""
    evidence = audit_chain.evidence(conn, naming.results_schema(loaded.name))
    evidence.footprints, evidence.footprints_kept_since = footprints.recorded(conn, loaded.name, loaded.collaboration.difference_checks.retention_days)
    return evidence


def chain_references(instance: dg.DagsterInstance, loaded: LoadedCollaboration) -> set[str]:
    """Every audit-chain hash the event log recorded (releases, ad-hoc runs and refusals, applied policies)."""
    return {str(e["metadata"]["audit_chain_sha256"]) for e in entries(instance, loaded) if e["metadata"].get("audit_chain_sha256")}
