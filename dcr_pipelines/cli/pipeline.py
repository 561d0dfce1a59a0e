"""`dcr ingest`, `dcr run`, `dcr release`: data in, the pipeline up to the pre-noise tables, a release on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..lib.text import plural
from ._common import (
    INFRASTRUCTURE,
    _collaboration,
    _definitions,
    _instance,
    _print_release,
    _release_rows,
    _run_collaboration,
    _run_log,
    _runtime,
    err,
    fail,
    main,
    out,
)
from ._output import Listing, emit, format_option, text_only


@main.command()
@click.argument("collab")
@click.argument("party")
@click.argument("dataset")
@click.argument("file", type=click.Path(path_type=Path))
def ingest(collab: str, party: str, dataset: str, file: Path) -> None:
    """Upload FILE as PARTY's next file of DATASET in COLLAB (through Dagster).

    The file is copied into the dataset's upload queue and gets a number at
    once; a replace-mode dataset then makes it the whole dataset, an
    append-mode one adds its rows. A refused file is quarantined with a report
    and the current data stays as it was.

    \b
    Example:
      dcr ingest demo retailer purchases ./purchases.csv
    """
    from ..defs.ingest import partitions_name, target
    from ..lib import naming
    from ..lib.database import connect
    from ..lib.upload_files import SUFFIXES, accepted_suffix
    from ..runner import ingest_run_config, materialize
    from ..services import ingest as ingest_lib
    from ..store import uploads as queue

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    ds = loaded.collaboration.datasets.get(dataset)
    if ds is None:
        fail(f"{collab} declares no dataset {dataset!r} (datasets: {', '.join(loaded.collaboration.datasets)})", 2)
    if ds.owner != party:
        fail(f"dataset {dataset} belongs to {ds.owner}, not {party!r}", 2)
    if not file.exists():
        fail(f"{file}: no such file", 2)
    if not file.is_file():
        fail(f"{file}: not a regular file (a directory, pipe or device cannot be uploaded)", 2)
    if not accepted_suffix(file.name, ds.format.type):
        fail(f"{file.name}: dataset {dataset} takes {ds.format.type} files ({', '.join(SUFFIXES[ds.format.type])})", 2)
    url = runtime.warehouse.url()
    t = target(loaded, dataset, runtime.settings.landing, url)
    try:
        with connect(url) as conn:
            upload = ingest_lib.land_copy(conn, t, file)
    except (ingest_lib.LandingRefused, ingest_lib.UploadRejected) as exc:
        fail(f"upload refused, nothing was queued: {exc}", 2)
    except PermissionError as exc:
        fail(f"{exc.filename or file}: permission denied ({file} must be readable and the queue folder {t.queue_dir} writable); "
             "nothing was queued: fix the permissions and run it again", INFRASTRUCTURE)
    except OSError as exc:
        fail(f"copying {file.name} into the upload queue {t.queue_dir} failed: {exc.strerror or exc}; nothing was queued "
             "(free space on that disk, or set DCR_HOME to a larger one, and run it again)", INFRASTRUCTURE)
    defs = _definitions(runtime)
    instance = _instance()
    key = naming.raw_key(collab, dataset)
    with out.status(f"upload #{upload.seq}: validating and loading {file.name}..."):
        if ds.mode == "append":
            instance.add_dynamic_partitions(partitions_name(collab, party, dataset), [upload.partition_key])
            outcome = materialize(defs, [key], instance=instance, partition_key=upload.partition_key, stdout_log=_run_log())
        else:
            outcome = materialize(defs, [key], instance=instance, run_config=ingest_run_config(collab, dataset, upload=upload.seq),
                                  stdout_log=_run_log())
    with connect(url) as conn:
        decided = queue.get(conn, upload.seq)
    assert decided is not None
    where = f"{collab}/{party}/{dataset}"
    if decided.state == "accepted":
        meta = outcome.metadata.get("/".join(key), {})
        extra = ""
        if decided.duplicate_rows:
            extra = (f"; {plural(decided.dropped_rows, 'duplicate row')} dropped" if decided.dropped_rows
                     else f"; {plural(decided.duplicate_rows, 'row')} "
                          f"{'repeats' if decided.duplicate_rows == 1 else 'repeat'} an earlier row (kept)")
        total = f", {plural(meta['row_count'], 'row')} in the dataset" if ds.mode == "append" and meta else ""
        out.print(f"{where}: upload #{decided.seq} accepted as version {decided.version}, {plural(decided.row_count or 0, 'row')}{total}{extra}")
    elif decided.state == "duplicate":
        out.print(f"{where}: upload #{decided.seq} unchanged (already loaded): {decided.reason}")
    elif decided.state in ("queued", "processing"):
        fail(f"upload #{decided.seq} is queued but was not processed: {outcome.failure or 'the run failed'} "
             f"(the next `dcr run {collab}` or the landing sensor picks it up)", INFRASTRUCTURE)
    else:
        fail(f"upload #{decided.seq} {decided.state}: {decided.reason} (quarantined with a report in {t.quarantine_dir}); the current data is unchanged")


@main.command()
@click.argument("collab")
def run(collab: str) -> None:
    """Materialize COLLAB up to the pre-noise tables: ingest, staging, matching, analyses. Releases nothing, charges nothing.

    Releases happen only when someone asks: `dcr release`, a materialization in
    the UI, or a schedule for queries whose YAML says `release: scheduled`.

    \b
    Example:
      dcr run demo
    """
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    _run_collaboration(_definitions(runtime), loaded)
    out.print(f"nothing was released and no budget was spent; release with `dcr release {collab} QUERY`"
              + (f" ({', '.join(loaded.queries)})" if loaded.queries else ""))


@main.command()
@click.argument("collab")
@click.argument("query")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="A query parameter; repeatable.")
@click.option("--dry-run", is_flag=True, help="Show the epsilon the release would cost and run nothing.")
@click.option("--chart", type=click.Path(path_type=Path), help="Also write a PNG chart of the released values with their intervals.")
@format_option()
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="A member's credentials file (`dcr member add`): "
              "ask as that member (the query's consumer); or set DCR_MEMBER_URL.")
def release(collab: str, query: str, params: tuple[str, ...], dry_run: bool, chart: Path | None, fmt: str, credentials_path: Path | None) -> None:
    """Run approved QUERY of COLLAB and release it (with differential privacy, or thresholded under the threshold rule).

    \b
    Examples:
      dcr release demo campaign_reach --dry-run
      dcr release demo campaign_reach --param since=2026-03-01
    """
    from ..lib import naming
    from ..lib.params import ParameterError, validate_params
    from ..runner import materialize, release_run_config
    from .member import ask, credentials

    if dry_run:
        text_only(fmt, "--dry-run")
    if chart is not None and chart.suffix.lower() != ".png":
        fail(f"--chart {chart}: the chart is a PNG; give a file name ending in .png", 2)
    if chart is not None and not chart.resolve().parent.is_dir():
        fail(f"--chart {chart}: folder {chart.resolve().parent} does not exist; create it or choose another", 2)
    creds = credentials(credentials_path)
    if creds:
        supplied_params = dict(item.split("=", 1) for item in params if "=" in item)
        if len(supplied_params) != len(params):
            fail(f"--param {next(i for i in params if '=' not in i)!r}: expected NAME=VALUE", 2)
        done = ask(creds, collab, "release", {"query": query, "params": supplied_params, **({"dry_run": True} if dry_run else {})})
        if dry_run:
            _print_member_dry_run(query, done.answer)
            return
        _print_member_release(collab, query, done.answer, fmt)
        if chart is not None:
            from ..lib.chart import release_chart

            answer = done.answer
            release_chart(answer["rows"], list(answer.get("dimensions") or []), list(answer.get("metrics") or []),
                          f"{collab}/{query} release {answer['release_id']}", chart)
            err.print(f"chart written to {chart}")
        return
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    if query not in loaded.queries:
        fail(f"{collab} has no approved query {query!r} (queries: {', '.join(loaded.queries) or 'none'})", 2)
    approved = loaded.queries[query]
    supplied = {}
    for item in params:
        if "=" not in item:
            fail(f"--param {item!r}: expected NAME=VALUE", 2)
        name, value = item.split("=", 1)
        supplied[name.strip()] = value
    try:
        values = validate_params(approved, supplied)
    except ParameterError as exc:
        fail(str(exc), 2)
    if dry_run and approved.spec.rule == "threshold":
        out.print(f"threshold rule: exact values, groups with fewer than {approved.spec.min_distinct_units} distinct people removed; "
                  "no epsilon is charged")
        return
    if dry_run:
        _dry_run(runtime, loaded, approved)
        return
    from ..defs.release import release_definitions

    defs = release_definitions(loaded, runtime.settings, runtime.warehouse.url())  # this collaboration's releases only
    with err.status(f"running {query} and releasing it through Dagster..."):
        outcome = materialize(
            defs, [naming.release_key(collab, query)], instance=_instance(), run_config=release_run_config(collab, query, values), stdout_log=_run_log()
        )
    if not outcome.success:
        fail(outcome.failure or "release failed")
    meta = outcome.metadata["/".join(naming.release_key(collab, query))]
    spec = approved.spec
    listing = release_listing(collab, query, list(spec.dimensions), list(spec.metrics), _release_rows(runtime, loaded, query, meta["release_id"]),
                              {**meta, "rule": spec.rule})
    if meta["cached"] and fmt == "table":
        out.print("identical release found (same query, parameters and data): returning it, no budget charged")
    emit(listing, fmt, table=lambda: _print_release(runtime, loaded, query, meta["release_id"]))
    budget = next((b for b in loaded.collaboration.budgets if b.consumer == approved.spec.consumer), None)
    remaining = meta.get("epsilon_remaining")
    if approved.spec.rule == "dp" and budget is not None and remaining is not None and remaining < budget.warning_level:
        err.print(f"warning: {approved.spec.consumer}'s privacy budget is low: epsilon {remaining:.3g} of {budget.epsilon:g} left "
                  f"(under warn_below {budget.warning_level:.3g})", markup=False, soft_wrap=True)
    if chart is not None:
        from ..lib.chart import release_chart

        spec = approved.spec
        release_chart(_release_rows(runtime, loaded, query, meta["release_id"]), list(spec.dimensions), list(spec.metrics),
                      f"{collab}/{query} release {meta['release_id']}", chart)
        err.print(f"chart written to {chart}")


def _dry_run(runtime: Any, loaded: Any, approved: Any) -> None:
    """Print the noise plan and the cost of a DP release against the consumer's remaining budget; refuse (exit 1) if it does not fit."""
    from ..lib.database import connect
    from ..services import budget as budget_service

    with connect(runtime.warehouse.url()) as conn:
        planned = budget_service.dry_run(conn, loaded, approved)
    _print_dry_run(planned, approved.name, approved.spec.consumer, budget_service.averages(approved))


def _print_dry_run(planned: Any, name: str, consumer: str, averaged: list[str]) -> None:
    for p in planned.plans:
        out.print(f"{p.column}: sensitivity {p.sensitivity:g}, laplace scale {p.scale:.4g}, epsilon {p.epsilon:.4g}, 95% accuracy +/-{p.accuracy:.4g}")
    if planned.selection is not None:
        s = planned.selection
        out.print(f"{s.metric}: key selection, laplace scale {s.scale:.4g}, threshold {s.threshold}, epsilon {s.epsilon:.4g}, delta {s.delta:.3g}")
    by_column = {p.column: p for p in planned.plans}
    for metric in averaged:
        total, count = by_column[f"{metric}__sum"], by_column[f"{metric}__count"]
        out.print(f"{metric}: an average, released as noisy sum / noisy count: epsilon {total.epsilon:.4g} (sum) + {count.epsilon:.4g} (count) "
                  f"= {total.epsilon + count.epsilon:.4g}; its 95% interval comes from the two parts' intervals")
    status = planned.status
    window = f" (rolling {status.period_days}-day window)" if status.period_days else ""
    when = f"; it refreshes at {status.refreshes_at:%Y-%m-%d %H:%M} UTC" if status.refreshes_at else ""
    if not planned.fits:
        short = (f"epsilon {planned.epsilon:.4g}, and {consumer} has {status.remaining:.4g} of {status.total:.4g} left"
                 if planned.epsilon > status.remaining + 1e-12 else
                 f"delta {planned.delta:.3g}, and {consumer} has delta {status.delta_remaining:.3g} of {status.delta_total:.3g} left")
        fail(f"the release of {name} would cost {short}{window}{when}: it does not fit, nothing was run or charged "
             "(an identical earlier request is still answered from the store, free)")
    out.print(f"release would cost epsilon {planned.epsilon:.4g}" + (f" and delta {planned.delta:.3g}" if planned.delta else "")
              + f" of {consumer}'s budget: {status.remaining:.4g} of {status.total:.4g} left now, {planned.remaining_after:.4g} after it{window}",
              soft_wrap=True)


def _print_member_dry_run(query: str, answer: dict[str, Any]) -> None:
    from ..services.budget import DryRun

    if answer.get("rule") == "threshold":
        out.print(f"threshold rule: exact values, groups with fewer than {answer.get('min_distinct_units')} distinct people removed; "
                  "no epsilon is charged")
        return
    _print_dry_run(DryRun.from_json(answer["plan"]), query, str(answer.get("consumer")), list(answer.get("averages") or []))


def release_listing(collab: str, query: str, dimensions: list[str], metrics: list[str], rows: list[dict[str, Any]], meta: dict[str, Any]) -> Listing:
    """A release as every format prints it: one row per group (each metric, with its interval under DP); the epsilon
    charged and left, and for a threshold release how many groups the difference check withheld."""
    from ..lib.presentation import release_records

    columns, records = release_records(dimensions, metrics, rows)
    threshold = meta.get("rule") == "threshold"
    notes = []
    if meta.get("cached"):
        notes.append("identical release found (same query, parameters and data): stored result returned, no budget charged")
    if threshold:
        notes.append("threshold rule: exact values; groups under the policy's minimum of distinct people are removed; no epsilon charged")
    elif meta.get("epsilon_remaining") is not None:
        notes.append(f"differential privacy: noised values with 95% intervals (_ci_low, _ci_high); charged epsilon "
                     f"{float(meta.get('epsilon_charged') or 0):.4g}; {float(meta['epsilon_remaining']):.4g}"
                     + (f" of {float(meta['epsilon_budget']):.4g}" if meta.get("epsilon_budget") is not None else "") + " left")
    about = {"collaboration": collab, "query": query, "release_id": meta["release_id"], "cached": bool(meta.get("cached")), "rule": meta.get("rule"),
             "params": meta.get("params") or {}, "epsilon_charged": meta.get("epsilon_charged", 0.0), "epsilon_remaining": meta.get("epsilon_remaining")}
    return Listing(columns, records, title=f"{collab}/{query}, release {meta['release_id']}, params {json.dumps(meta.get('params') or {})}",
                   notes=notes, withheld=int(meta.get("withheld_groups") or meta.get("withheld_rows") or 0) if threshold else None,
                   withheld_because=list(meta.get("withheld_because") or []), about=about, right=columns[len(dimensions):])


def _print_member_release(collab: str, query: str, answer: dict[str, Any], fmt: str) -> None:
    """A release answered to a member's request: one row per group (each noised value with its interval) and what it cost."""
    rows = list(answer.get("rows") or [])
    dimensions = list(answer.get("dimensions") or [])
    metrics = list(answer.get("metrics") or dict.fromkeys(str(r["metric"]) for r in rows))
    emit(release_listing(collab, query, dimensions, metrics, rows, answer), fmt)
