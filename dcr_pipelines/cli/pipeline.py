"""`dcr ingest`, `dcr run`, `dcr release`: data in, the pipeline up to the pre-noise tables, a release on request."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from ._common import (
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


@main.command()
@click.argument("collab")
@click.argument("party")
@click.argument("dataset")
@click.argument("file", type=click.Path(path_type=Path))
def ingest(collab: str, party: str, dataset: str, file: Path) -> None:
    """Upload FILE as the next version of PARTY's DATASET in COLLAB (through Dagster).

    \b
    Example:
      dcr ingest demo retailer purchases ./purchases.csv
    """
    from ..lib import naming
    from ..runner import ingest_run_config, materialize

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    ds = loaded.collaboration.datasets.get(dataset)
    if ds is None:
        fail(f"{collab} declares no dataset {dataset!r} (datasets: {', '.join(loaded.collaboration.datasets)})", 2)
    if ds.owner != party:
        fail(f"dataset {dataset} belongs to {ds.owner}, not {party!r}", 2)
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    from ..defs.collaboration import UPLOAD_SUFFIXES, landing_folder

    if file.suffix not in UPLOAD_SUFFIXES[ds.format.type]:
        fail(f"{file.name}: dataset {dataset} takes {ds.format.type} files ({', '.join(UPLOAD_SUFFIXES[ds.format.type])})", 2)
    # The upload lands like any other: a copy in the dataset's landing folder (the original is left alone).
    folder = landing_folder(runtime.settings.landing, collab, party, dataset)
    folder.mkdir(parents=True, exist_ok=True)
    landed = folder / f"{time.strftime('%Y%m%dT%H%M%S')}__{file.name}"
    shutil.copyfile(file, landed.with_name("." + landed.name))
    landed.with_name("." + landed.name).replace(landed)
    defs = _definitions(runtime)
    with out.status(f"validating and loading {file.name}..."):
        outcome = materialize(
            defs, [naming.raw_key(collab, party, dataset)], instance=_instance(),
            run_config=ingest_run_config(collab, party, dataset, str(landed)), stdout_log=_run_log(),
        )
    if not outcome.success:
        fail(outcome.failure or "ingest failed")
    meta = outcome.metadata["/".join(naming.raw_key(collab, party, dataset))]
    state = "unchanged (already loaded)" if meta["unchanged"] else "loaded"
    out.print(f"{collab}/{party}/{dataset}: version {meta['version']} {state}, {meta['row_count']:,} rows")


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
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def release(collab: str, query: str, params: tuple[str, ...], dry_run: bool, chart: Path | None, fmt: str) -> None:
    """Run approved QUERY of COLLAB and release it (with differential privacy, or thresholded under the threshold rule).

    \b
    Examples:
      dcr release demo campaign_reach --dry-run
      dcr release demo campaign_reach --param since=2026-03-01
    """
    from ..lib import naming
    from ..lib.params import ParameterError, validate_params
    from ..lib.privacy.mechanisms import plan_key_selection, plan_release, release_cost
    from ..runner import materialize, release_run_config

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
        plans = plan_release(approved.spec)
        selection = plan_key_selection(approved.spec)
        for p in plans:
            out.print(f"{p.column}: sensitivity {p.sensitivity:g}, laplace scale {p.scale:.4g}, epsilon {p.epsilon:.4g}, 95% accuracy +/-{p.accuracy:.4g}")
        if selection is not None:
            out.print(
                f"{selection.metric}: key selection, laplace scale {selection.scale:.4g}, threshold {selection.threshold}, "
                f"epsilon {selection.epsilon:.4g}, delta {selection.delta:.3g}"
            )
        epsilon, delta = release_cost(plans, selection)
        out.print(f"release would cost epsilon {epsilon:.4g}" + (f" and delta {delta:.3g}" if delta else "") + f" of {approved.spec.consumer}'s budget")
        return
    defs = _definitions(runtime)
    with err.status(f"running {query} and releasing it through Dagster..."):
        outcome = materialize(
            defs, [naming.release_key(collab, query)], instance=_instance(), run_config=release_run_config(collab, query, values), stdout_log=_run_log()
        )
    if not outcome.success:
        fail(outcome.failure or "release failed")
    meta = outcome.metadata["/".join(naming.release_key(collab, query))]
    if fmt == "json":
        rows = _release_rows(runtime, loaded, query, meta["release_id"])
        out.print_json(data={"release_id": meta["release_id"], "cached": meta["cached"], "epsilon_charged": meta["epsilon_charged"],
                             "epsilon_remaining": meta["epsilon_remaining"], "params": meta["params"], "rows": rows})
    else:
        if meta["cached"]:
            out.print("identical release found (same query, parameters and data): returning it, no budget charged")
        _print_release(runtime, loaded, query, meta["release_id"])
    if chart is not None:
        from ..lib.chart import release_chart

        spec = approved.spec
        release_chart(_release_rows(runtime, loaded, query, meta["release_id"]), list(spec.dimensions), list(spec.metrics),
                      f"{collab}/{query} release {meta['release_id']}", chart)
        err.print(f"chart written to {chart}")
