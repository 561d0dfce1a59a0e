"""Shared by the stage factories: run configs, the dbt translator, landing folders, request keys, audit metadata."""

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import dagster as dg

from ..lib import naming
from ..lib.naming import PSI_FOLDER, landing_folder  # noqa: F401 (where the sensors and the CLI look for files)
from ..lib.policy import LoadedCollaboration
from ..lib.presentation import release_table
from ..store import ledger

T = TypeVar("T")


class UploadConfig(dg.Config):
    """Which upload the run is for: a queued upload's number (``dcr ingest`` lands it first), or a file waiting in
    the dataset's landing folder; neither means every waiting upload (replace mode loads the newest)."""

    upload: int = 0
    path: str = ""


class AnalysisConfig(dg.Config):
    """Parameters per approved query: {"query": {"param": "value"}}; the queries' defaults fill the rest."""

    params: dict[str, dict[str, str]] = {}


class ReleaseConfig(dg.Config):
    """The request: who asks, and the query's parameters (its YAML's defaults fill the rest). Each release is computed for
    exactly these. A release spends privacy budget, so one launched without ``requested_by`` (a click on "Materialize",
    `dg launch --assets` with no config) is refused and charges nothing."""

    requested_by: str = ""
    params: dict[str, str] = {}
    request: int = 0  # a member's request row (dcr_meta.member_requests): its login asks, its params are used


class AdHocConfig(dg.Config):
    """One ad-hoc SQL query and the member who runs it (see `dcr query run`)."""

    runner: str = ""
    sql: str = ""
    request: int = 0  # a member's request row (dcr_meta.member_requests): its member runs its SQL, runner/sql are not read


UPLOAD_CHECK = "upload_contract"
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


def release_preview(loaded: LoadedCollaboration, query_name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The released table itself, for the asset page (a table, shown inline however long): one row per group, values
    with their 95% intervals, large values shortened; and what the brackets mean."""
    shown = release_table(loaded.queries[query_name].spec, rows, compact=True)  # it fits the asset page beside Dagster's panels
    schema = dg.TableSchema(columns=[dg.TableColumn(name=h, type="string") for h in shown.headers])
    return {
        "released_values": dg.MetadataValue.table(records=[dg.TableRecord(dict(zip(shown.headers, row, strict=True))) for row in shown.rows],
                                                  schema=schema),
        "about_these_values": shown.note,
    }


BUDGET_LOW_TAG = "dcr/budget_low"


def warn_budget(context: dg.AssetExecutionContext, loaded: LoadedCollaboration, consumer: str, remaining: float, total: float) -> None:
    """Under the policy's ``warn_below``: a warning in the run's log and a tag on the run (the budget sensor says it too)."""
    budget = next((b for b in loaded.collaboration.budgets if b.consumer == consumer), None)
    if budget is None or remaining >= budget.warning_level:
        return
    message = f"{consumer} has epsilon {remaining:.3g} of {total:.3g} left, under warn_below {budget.warning_level:.3g}"
    context.log.warning(f"privacy budget low: {message}")
    context.instance.add_run_tags(context.run.run_id, {BUDGET_LOW_TAG: message})


PARTY_METADATA = "party"  # the owning party, written on each party-private event: the audit filters on what was recorded


def party_assets(loaded: LoadedCollaboration) -> dict[tuple[str, str], str]:
    """(stage, label) of every party-private asset (uploads, normalised and secure tables, identity lists) -> its party."""
    c = loaded.name
    out = {}
    for name, ds in loaded.collaboration.datasets.items():
        for key in (naming.raw_key(c, name), naming.normalised_key(c, name), naming.staging_key(c, name)):
            out[key[1], key[2]] = ds.owner
    for party in loaded.parties():
        key = naming.identities_key(c, party)
        out[key[1], key[2]] = party
    return out


CONCERNS_METADATA = "concerns"  # the parties an analysis, release or ad-hoc entry concerns, written when it is made


def concerns(loaded: LoadedCollaboration, datasets: Iterable[str], also: Iterable[str] = ()) -> dict[str, str]:
    """``{concerns: "a, b"}``: the owners of ``datasets`` (by the policy of the moment) and ``also`` (a runner, the
    receivers), for an entry's metadata; what `dcr audit --member` filters on later, whatever the policy says then."""
    owned = loaded.collaboration.datasets
    parties = {owned[d].owner for d in datasets if d in owned} | set(also)
    return {CONCERNS_METADATA: ", ".join(sorted(parties))}


def recorded_owners(loaded: LoadedCollaboration, key: dg.AssetKey) -> dict[str, str]:
    """What a dbt model's event records about whom it concerns: its party (a party-private model), or the parties
    of a matched or pre-noise view (owners of its datasets, and a query's receivers)."""
    party = party_of(loaded, key)
    if party:
        return {PARTY_METADATA: party}
    path = key.path
    if len(path) != 3 or path[1] != "analysis":
        return {}
    name = path[2]
    query = loaded.queries.get(name.removeprefix(naming.PRE_NOISE_LABEL)) if name.startswith(naming.PRE_NOISE_LABEL) else None
    if query is not None:
        return concerns(loaded, query.datasets, query.spec.receivers)
    if name.startswith(naming.MATCHED_LABEL):
        return concerns(loaded, [name.removeprefix(naming.MATCHED_LABEL).split("__")[0]])
    return {}


def party_of(loaded: LoadedCollaboration, key: dg.AssetKey) -> str | None:
    """The party whose private asset ``key`` is, by the current policy (None for shared assets)."""
    path = key.path
    return party_assets(loaded).get((path[1], path[2])) if len(path) == 3 else None
