"""A DP release of one approved query: complete the public domain, noise, charge, store."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..lib import naming
from ..lib.policy import ApprovedQuery, LoadedCollaboration
from ..lib.policy.models import Budget, MetricKind
from ..lib.privacy import difference
from ..lib.privacy.mechanisms import (
    ALPHA,
    KeySelectionPlan,
    NoisePlan,
    add_noise,
    dp_accuracy_of_threshold,
    half_width,
    mean_interval,
    needs_key_selection,
    plan_count,
    plan_key_selection,
    plan_release,
    release_cost,
    select_keys,
)
from ..store import access, footprints, ledger
from ..store import analysis as store_analysis


class ReleaseRefused(Exception):
    """The release cannot run under the policy (no budget, unsupported settings)."""


def consumer_budget(loaded: LoadedCollaboration, consumer: str) -> Budget:
    for budget in loaded.collaboration.budgets:
        if budget.consumer == consumer:
            return budget
    raise ReleaseRefused(f"{consumer} has no privacy budget in {loaded.name} (collaboration.yaml: budgets)")


KEY_SEPARATOR = "\x1f"
THRESHOLD_UNITS = "dcr_units"  # distinct people per group, computed by a threshold query's model
THRESHOLD_PEOPLE = "dcr_people"  # their unit numbers, for the difference checks


REQUEST = "dcr_request"  # the request a pre-noise row was built for, written by the query's model


def _own_rows(rows: list[Any], query: ApprovedQuery, request: str | None) -> list[Any]:
    """Rows whose last column (their request) is ``request``; any other row means the table is someone else's."""
    if request is not None and any(row[-1] != request for row in rows):
        raise ReleaseRefused(f"the pre-noise table of {query.name} holds rows built for another request; nothing was released or charged, try again")
    return [row[:-1] for row in rows]


def _cells(conn: psycopg.Connection, loaded: LoadedCollaboration, query: ApprovedQuery, columns: list[str], request: str | None = None) -> list[dict[str, Any]]:
    """Pre-noise values per group: every group of the public domains (0 where empty), or, with key
    selection, the groups present in the data (the threshold mechanism decides which are released)."""
    spec = query.spec
    dims = list(spec.dimensions)
    table = sql.Identifier(naming.analysis_schema(loaded.name), f"query_{query.name}")
    select = sql.SQL(", ").join([sql.Identifier(d) for d in dims] + [sql.Identifier(c) for c in columns] + [sql.Identifier(REQUEST)])
    found = {
        tuple(str(v) for v in row[: len(dims)]): row[len(dims) :]
        for row in _own_rows(store_analysis.read_pre_noise(conn, loaded.name, sql.SQL("select {} from {}").format(select, table)), query, request)
    }
    if needs_key_selection(spec):
        return [dict(zip(dims, key, strict=False)) | {c: float(v or 0) for c, v in zip(columns, values, strict=False)} for key, values in found.items()]
    cells = []
    for key in itertools.product(*(d.domain or () for d in spec.dimensions.values())):
        values = found.get(tuple(key), (0,) * len(columns))
        cell: dict[str, Any] = dict(zip(dims, key, strict=False))
        cell.update({c: float(v or 0) for c, v in zip(columns, values, strict=False)})
        cells.append(cell)
    return cells


def _noised_rows(
    cells: list[dict[str, Any]], query: ApprovedQuery, plans: list[NoisePlan], selection: KeySelectionPlan | None
) -> list[dict[str, Any]]:
    dims = list(query.spec.dimensions)
    accuracy: dict[str, float | None] = {p.column: p.accuracy for p in plans}
    selected: dict[str, float] = {}
    if selection is not None:
        counts = {KEY_SEPARATOR.join(str(c[d]) for d in dims): int(c[selection.metric]) for c in cells}
        selected = select_keys(selection, counts)
        cells = [c for c in cells if KEY_SEPARATOR.join(str(c[d]) for d in dims) in selected]
        accuracy[selection.metric] = dp_accuracy_of_threshold(selection)
    noised = {p.column: add_noise(p, [c[p.column] for c in cells]) for p in plans}
    by_column = {p.column: p for p in plans}
    mean_halves = {  # 97.5% half-widths of each average's sum and count: together a 95% interval of the ratio
        name: (half_width(by_column[f"{name}__sum"], ALPHA / 2), half_width(by_column[f"{name}__count"], ALPHA / 2))
        for name, m in query.spec.metrics.items() if m.aggregate == MetricKind.AVG
    }
    if selection is not None:
        noised[selection.metric] = [selected[KEY_SEPARATOR.join(str(c[d]) for d in dims)] for c in cells]
    rows: list[dict[str, Any]] = []
    for i, cell in enumerate(cells):
        for metric_name, metric in query.spec.metrics.items():
            row = {d: cell[d] for d in dims}
            value: float | None
            interval: tuple[float, float] | None = None
            if metric.aggregate in (MetricKind.COUNT_UNITS, MetricKind.COUNT, MetricKind.SUM):
                column = metric_name if metric.aggregate != MetricKind.SUM else f"{metric_name}__sum"
                value, half = noised[column][i], accuracy[column]
                if half is not None:
                    interval = (value - half, value + half)
            else:  # an average: noisy sum / noisy count clamped to the bounds, its interval from both parts' (post-processing)
                assert metric.bounds is not None
                total, count = noised[f"{metric_name}__sum"][i], noised[f"{metric_name}__count"][i]
                value = min(max(total / count, metric.bounds[0]), metric.bounds[1]) if count >= 1 else None
                if value is not None:
                    interval = mean_interval(total, mean_halves[metric_name][0], count, mean_halves[metric_name][1], metric.bounds)
            row.update(metric=metric_name, value=value, ci_low=interval[0] if interval else None, ci_high=interval[1] if interval else None)
            rows.append(row)
    return whole_counts(query.spec, rows)


def whole_counts(spec: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counts of people or rows are released as whole numbers (post-processing): the value rounded, its 95% interval
    widened to the whole numbers around it (floor, ceiling) so that it still covers what it did."""
    counts = {name for name, m in spec.metrics.items() if m.aggregate in (MetricKind.COUNT_UNITS, MetricKind.COUNT)}
    for row in rows:
        if row["metric"] in counts and row["value"] is not None:
            row["value"] = round(row["value"])
            if row.get("ci_low") is not None and row.get("ci_high") is not None:
                row["ci_low"], row["ci_high"] = math.floor(row["ci_low"]), math.ceil(row["ci_high"])
    return rows


def _store(loaded: LoadedCollaboration, query: ApprovedQuery) -> Any:
    schema = naming.results_schema(loaded.name)
    dims = list(query.spec.dimensions)
    table = sql.Identifier(schema, query.name)

    def store(conn: psycopg.Connection, release_id: str, rows: list[dict[str, Any]]) -> None:
        columns = sql.SQL(", ").join(sql.SQL("{} text not null").format(sql.Identifier(d)) for d in dims)
        conn.execute(
            sql.SQL(
                "create table if not exists {} (release_id text not null, {}, metric text not null, "
                "value double precision, ci_low double precision, ci_high double precision)"
            ).format(table, columns)
        )
        names = ["release_id", *dims, "metric", "value", "ci_low", "ci_high"]
        insert = sql.SQL("copy {} ({}) from stdin").format(table, sql.SQL(", ").join(map(sql.Identifier, names)))
        with conn.cursor().copy(insert) as copy:
            for row in rows:
                copy.write_row([release_id, *(row[d] for d in dims), row["metric"], row["value"], row["ci_low"], row["ci_high"]])
        access.grant_results(conn, loaded, query.name)

    return store


def _store_with_footprints(loaded: LoadedCollaboration, query: ApprovedQuery, released: Callable[[], list[tuple[int, difference.People]]]) -> Any:
    """Store a thresholded release and keep its groups' people sets for later difference checks (same transaction)."""
    store = _store(loaded, query)
    checks = loaded.collaboration.difference_checks

    def store_and_record(conn: psycopg.Connection, release_id: str, rows: list[dict[str, Any]]) -> None:
        store(conn, release_id, rows)
        if checks.enabled:
            footprints.record(conn, loaded.name, "release", release_id, released(), checks.retention_days)

    return store_and_record


def release_query(
    conn: psycopg.Connection,
    loaded: LoadedCollaboration,
    query: ApprovedQuery,
    params: dict[str, str],
    input_versions: dict[str, Any],
    export_dir: Path | None = None,
    request: str | None = None,
    run_id: str | None = None,
    requested_by: str | None = None,
) -> ledger.StoredRelease:
    """Release ``query`` with DP noise, charging its consumer's budget (or return the stored identical release).

    A query under the threshold rule is released without noise and without charge: its groups with
    fewer distinct people than ``min_distinct_units`` are removed before anything is stored.
    With ``request``, every pre-noise row read must have been built for it (``ReleaseRefused`` otherwise).
    """
    if query.spec.rule == "threshold":
        return _release_thresholded(conn, loaded, query, params, input_versions, export_dir, request, run_id, requested_by)
    plans = plan_release(query.spec)
    selection = plan_key_selection(query.spec)
    budget = consumer_budget(loaded, query.spec.consumer)
    schema = naming.results_schema(loaded.name)
    ledger.ensure_tables(conn, schema)
    columns = sorted({p.column for p in plans} | ({selection.metric} if selection else set()))
    # Pre-noise values are read before the ledger transaction: a failure here has drawn no noise. A stored identical
    # release (releases are never removed) is returned by the ledger as it is: its view is not read at all.
    stored_already = ledger.stored_release_id(conn, schema, ledger.cache_key(query.sha256, params, input_versions)) is not None
    cells = [] if stored_already else _cells(conn, loaded, query, columns, request)
    epsilon, delta = release_cost(plans, selection)
    stored = ledger.charge_release(
        conn,
        schema,
        collaboration=loaded.name,
        query_name=query.name,
        budget=budget,
        key=ledger.cache_key(query.sha256, params, input_versions),
        params=params,
        input_versions=input_versions,
        cost=epsilon,
        delta=delta,
        draw=lambda: _noised_rows(cells, query, plans, selection),
        store_rows=_store(loaded, query),
        receivers=query.spec.receivers,
        query_sha256=query.sha256,
        run_id=run_id,
        requested_by=requested_by,
    )
    if export_dir is not None:
        export(stored, loaded, query, export_dir)
    return stored


def _release_thresholded(
    conn: psycopg.Connection,
    loaded: LoadedCollaboration,
    query: ApprovedQuery,
    params: dict[str, str],
    input_versions: dict[str, Any],
    export_dir: Path | None,
    request: str | None = None,
    run_id: str | None = None,
    requested_by: str | None = None,
) -> ledger.StoredRelease:
    spec = query.spec
    dims = list(spec.dimensions)
    columns: list[str] = []
    for name, metric in spec.metrics.items():
        if metric.aggregate in (MetricKind.COUNT_UNITS, MetricKind.COUNT):
            columns.append(name)
        else:
            columns.append(f"{name}__sum")
            if metric.aggregate == MetricKind.AVG:
                columns.append(f"{name}__count")
    table = sql.Identifier(naming.analysis_schema(loaded.name), f"query_{query.name}")
    select = sql.SQL(", ").join([sql.Identifier(d) for d in dims] + [sql.Identifier(c) for c in columns] + [sql.Identifier(THRESHOLD_PEOPLE), sql.Identifier(REQUEST)])
    stored_already = ledger.stored_release_id(conn, naming.results_schema(loaded.name), ledger.cache_key(query.sha256, params, input_versions))
    found = [] if stored_already else _own_rows(store_analysis.read_pre_noise(
        conn, loaded.name,
        sql.SQL("select {} from {} where {} >= %s order by {}").format(
            select, table, sql.Identifier(THRESHOLD_UNITS), sql.SQL(", ").join(sql.Identifier(d) for d in dims)
        ),
        (spec.min_distinct_units,),
    ), query, request)
    checks = loaded.collaboration.difference_checks
    sets = [difference.people(row[-1] or []) for row in found]
    released: list[int] = []
    withheld: list[str] = []
    held_back: list[int] = []

    def rows() -> list[dict[str, Any]]:
        """The groups that pass the threshold and the difference check (under its lock, inside the release)."""
        if checks.enabled:
            footprints.lock(conn, loaded.name)
            verdicts = footprints.check(conn, loaded.name, sets, spec.min_distinct_units, checks.retention_days, source="release", source_id=query.name)
            too_close = [v for v in verdicts if v.withheld_because is not None]
            # Which group was too close would say which group the person who differs is in: then no group is released.
            released[:] = [] if too_close else [v.row for v in verdicts]
            held_back[:] = [len(verdicts)] if too_close else []
            withheld[:] = [footprints.describe(v.withheld_because, spec.min_distinct_units) for v in too_close  # type: ignore[arg-type]
                           ] + ["the whole release is withheld: which group was too close would tell which group a person is in"] * bool(too_close)
        else:
            released[:] = list(range(len(found)))
        out = []
        for i in released:
            cell = dict(zip(dims + columns, found[i][:-1], strict=False))
            for name, metric in spec.metrics.items():
                if metric.aggregate in (MetricKind.COUNT_UNITS, MetricKind.COUNT):
                    value: float | None = float(cell[name])
                elif metric.aggregate == MetricKind.SUM:
                    value = float(cell[f"{name}__sum"])
                else:
                    count = float(cell[f"{name}__count"])
                    value = float(cell[f"{name}__sum"]) / count if count else None
                out.append({**{d: str(cell[d]) for d in dims}, "metric": name, "value": value, "ci_low": None, "ci_high": None})
        return whole_counts(spec, out)

    schema = naming.results_schema(loaded.name)
    ledger.ensure_tables(conn, schema)
    budget = next((b for b in loaded.collaboration.budgets if b.consumer == spec.consumer), None)
    stored = ledger.charge_release(
        conn,
        schema,
        collaboration=loaded.name,
        query_name=query.name,
        budget=budget or Budget.model_construct(consumer=spec.consumer, epsilon=0.0, delta=0.0, period_days=None),
        key=ledger.cache_key(query.sha256, params, input_versions),
        params=params,
        input_versions=input_versions,
        cost=0.0,
        draw=rows,
        store_rows=_store_with_footprints(loaded, query, lambda: [(i, sets[i]) for i in released]),
        receivers=spec.receivers,
        query_sha256=query.sha256,
        run_id=run_id,
        requested_by=requested_by,
        chained_with=(lambda: {"footprints_sha256": footprints.digest([(i, sets[i]) for i in released])}) if checks.enabled else None,
    )
    if export_dir is not None:
        export(stored, loaded, query, export_dir)
    if not stored.cached:
        stored = dataclasses.replace(stored, withheld=tuple(withheld), withheld_rows=sum(held_back))
    return stored


OVERLAP_CONSUMER = "(overlap)"  # the ledger account of overlap releases: not a member, so it cannot be confused with one


def release_overlap(conn: psycopg.Connection, loaded: LoadedCollaboration, matched: int, input_digest: str, run_id: str | None = None) -> ledger.StoredRelease:
    """Release the number of matched people with discrete Laplace noise (matching.overlap_release: dp), or exactly.

    One person changes the intersection size by at most one (sensitivity 1).
    Each new cross-reference is one release of ``overlap_epsilon``, charged to
    the collaboration's overlap account (``overlap_budget`` per 30 days); the
    same cross-reference returns the stored release. Raises
    ``ledger.BudgetExhausted`` when the account cannot pay: the overlap is
    then withheld, the pipeline goes on.
    """
    spec = loaded.collaboration.matching
    exact = spec.overlap_release == "exact"
    plan = None if exact else plan_count("matched_people", spec.overlap_epsilon)
    schema = naming.results_schema(loaded.name)
    ledger.ensure_tables(conn, schema)
    table = sql.Identifier(schema, access.OVERLAP)

    def draw() -> list[dict[str, Any]]:
        if plan is None:  # overlap_release: exact (the analysis rules let members count it anyway)
            return [{"metric": "matched_people", "value": float(matched), "ci_low": None, "ci_high": None}]
        value = add_noise(plan, [matched])[0]
        return [{"metric": "matched_people", "value": value, "ci_low": value - plan.accuracy, "ci_high": value + plan.accuracy}]

    def store(conn: psycopg.Connection, release_id: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            conn.execute(sql.SQL("insert into {} values (%s, %s, %s, %s, %s)").format(table),
                         (release_id, row["metric"], row["value"], row["ci_low"], row["ci_high"]))
        access.grant_results(conn, loaded, access.OVERLAP)

    versions = {"cross_reference": input_digest}
    return ledger.charge_release(
        conn,
        schema,
        collaboration=loaded.name,
        query_name=access.OVERLAP,
        budget=Budget.model_construct(consumer=OVERLAP_CONSUMER, epsilon=spec.overlap_budget, delta=0.0, period_days=30),
        key=ledger.cache_key(access.OVERLAP, {}, versions),
        params={},
        input_versions=versions,
        cost=0.0 if plan is None else plan.epsilon,
        draw=draw,
        store_rows=store,
        receivers=access.overlap_receivers(loaded),
        query_sha256="",
        run_id=run_id,
    )


def export(stored: ledger.StoredRelease, loaded: LoadedCollaboration, query: ApprovedQuery, export_dir: Path,
           receivers: Sequence[str] | None = None) -> list[Path]:
    """Write the release as CSV and Parquet into each receiver's folder (idempotent): the query's receivers, or
    ``receivers`` (those the release was made for, as its audit entry records them)."""
    frame: Any = None

    def table() -> Any:  # pandas only to write a file: a release already exported (or a refusal) does not pay for its import
        nonlocal frame
        if frame is None:
            import pandas as pd

            frame = pd.DataFrame(stored.rows)
            frame.insert(0, "release_id", stored.release_id)
        return frame

    written = []
    head = stored.audit.get("head")
    for receiver in query.spec.receivers if receivers is None else receivers:
        folder = export_dir / loaded.name / receiver / query.name
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("csv", "parquet"):
            path = folder / f"{stored.release_id}.{suffix}"
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                table().to_csv(tmp, index=False) if suffix == "csv" else table().to_parquet(tmp, index=False)
                tmp.replace(path)
            written.append(path)
        anchor = folder / f"{stored.release_id}.anchor.json"
        if head is not None and not anchor.exists():
            # The audit chain's head as of this release: `dcr audit --verify --anchor FILE` proves history up to it unchanged.
            tmp = anchor.with_name(anchor.name + ".tmp")
            tmp.write_text(json.dumps({**head, "release_id": stored.release_id}, indent=2) + "\n")
            tmp.replace(anchor)
            written.append(anchor)
    return written


def export_committed_by(conn: psycopg.Connection, loaded: LoadedCollaboration, run_id: str, export_dir: Path) -> list[str]:
    """Write the export files of every release ``run_id`` committed (a run killed between its commit and its exports):
    the release ids whose files were missing and are now written."""
    from ..store import audit_chain

    rows = [row for row in audit_chain.chain(conn, naming.results_schema(loaded.name)) if row.entry.get("run_id") == run_id]
    return export_missing(conn, loaded, rows, export_dir)


def export_missing(conn: psycopg.Connection, loaded: LoadedCollaboration, rows: list[Any], export_dir: Path) -> list[str]:
    """Of the audit chain's ``rows``, the releases of an approved query with an export file missing for a receiver
    (their run was killed between its commit and its last file): written now; their release ids."""
    schema = naming.results_schema(loaded.name)
    written: list[str] = []
    for row in rows:
        query = loaded.queries.get(str(row.entry.get("query_name")))
        if row.kind != "release" or query is None:
            continue
        files = [f"{row.ref}.{suffix}" for suffix in ("csv", "parquet", "anchor.json")]  # killed between two of them: the rest
        receivers = [str(r) for r in row.entry.get("receivers") or []]  # whom it was released to, not whom the policy names now
        if all((export_dir / loaded.name / r / query.name / f).exists() for r in receivers for f in files):
            continue
        stored = conn.execute(sql.SQL("select rows, epsilon from {} where release_id = %s").format(sql.Identifier(schema, "releases")),
                              (row.ref,)).fetchone()
        if stored is None:
            continue
        # The anchor its exports carry: the chain as of this release's own entry.
        release = ledger.StoredRelease(row.ref, True, float(stored[1]), list(stored[0]), None,  # type: ignore[arg-type]
                                       {"head": {"collaboration": loaded.name, "seq": row.seq, "chain_sha256": row.chain_sha256}})
        export(release, loaded, query, export_dir, receivers)
        written.append(row.ref)
    return written
