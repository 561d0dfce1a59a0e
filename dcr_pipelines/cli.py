"""The ``dcr`` command line. Every command that changes state runs through Dagster.

Exit codes: 0 success; 1 a run or release failed or was refused; 2 bad
usage or invalid input (policy, parameters, unknown names).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(file=sys.stderr, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


def _runtime() -> Any:
    from .lib.database import EmbeddedServerError
    from .lib.runtime import activate

    try:
        return activate()
    except EmbeddedServerError as exc:
        fail(str(exc))


def _definitions(runtime: Any) -> Any:
    from .definitions import build_definitions, secret_names
    from .lib.runtime import development_secrets_allowed, ensure_development_secrets, missing_secrets

    names = secret_names(runtime.settings)
    if development_secrets_allowed(runtime.embedded):
        ensure_development_secrets(runtime.settings.home, names)
    missing = missing_secrets(names)
    if missing:
        fail(f"secret {missing[0]} is not set{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: with an external database, "
             "secrets come from the environment only; set it, or DCR_DEV_SECRETS=1 for throw-away ones (docs/operations.md, Secrets)", 2)
    return build_definitions(runtime.settings)


def _run_log() -> Path:
    from .lib.settings import Settings

    return Settings.from_env().home / "logs" / "runs.log"


def _instance() -> Any:
    import dagster as dg

    return dg.DagsterInstance.get()


def _collaboration(runtime: Any, name: str) -> Any:
    from .lib.policy import PolicyError, load_collaboration

    folder = runtime.settings.policies / name
    try:
        return load_collaboration(folder)
    except PolicyError as exc:
        first = exc.issues[0]
        if not folder.is_dir():
            fail(f"no collaboration {name!r} under {runtime.settings.policies}", 2)
        fail(f"{first}" + (f" (and {len(exc.issues) - 1} more; run `dcr policy check`)" if len(exc.issues) > 1 else ""), 2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """An open-source data clean room.

    \b
    Examples:
      dcr demo --rows 10000            set up and run the demo collaboration
      dcr policy check                 lint every collaboration under policies/
      dcr release demo campaign_reach --param since=2026-03-01
      dcr budget demo
    """


# --- demo -------------------------------------------------------------------------


@main.command()
@click.option("--rows", default=10_000, show_default=True, help="Rows per party.")
@click.option("--overlap", default=0.3, show_default=True, help="Fraction of the retailer's customers the ad network also has.")
@click.option("--seed", default=7, show_default=True, help="Random seed of the generator.")
@click.option("--collab", default="demo", show_default=True, help="Collaboration folder to run.")
def demo(rows: int, overlap: float, seed: int, collab: str) -> None:
    """Generate both parties' uploads and run the demo collaboration end to end.

    \b
    Example:
      dcr demo --rows 100000 --overlap 0.4 --seed 1
    """
    from .lib import demo_data

    started = time.perf_counter()
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    at_home = [p for p in loaded.parties() if loaded.at_home(p)]
    generated_at = runtime.settings.home / "parties" / collab if at_home else runtime.settings.landing / collab
    try:
        files = demo_data.generate(generated_at, rows=rows, overlap=overlap, seed=seed)
    except ValueError as exc:
        fail(str(exc), 2)
    out.print(
        f"generated {rows:,} rows per party: {files.retailer_customers:,} retailer customers, "
        f"{files.ad_network_users:,} ad network users, {files.shared_people:,} shared"
    )
    if at_home:
        _demo_home_prepare(runtime, loaded, generated_at)
    out.print(f"database: {runtime.warehouse.redacted()}")
    defs = _definitions(runtime)
    if at_home and not _run_collaboration(defs, loaded, until_waiting=True):
        _demo_home_respond(runtime, loaded, generated_at)
        _run_collaboration(defs, loaded)
    elif not at_home:
        _run_collaboration(defs, loaded)
    _release_all(defs, loaded)  # the demo asks for every release explicitly, with the default parameters
    _print_releases(runtime, loaded)
    if loaded.collaboration.matching.overlap_release != "withheld":
        _print_overlap(runtime, loaded)
    out.print(f"done in {time.perf_counter() - started:.1f}s; open the asset graph with `make ui`")


def _demo_home_prepare(runtime: Any, loaded: Any, generated_at: Path) -> None:
    """The home parties' first half, run locally: keys, tokenised uploads and setup messages, as `dcr psi prepare` makes them."""
    from .lib import home_psi

    c = loaded.name
    for party in loaded.collaboration.matching.home_parties:
        key_path = generated_at / f"{party}.key"
        keys = home_psi.load_keys(key_path) if key_path.exists() else home_psi.generate_keys(key_path)
        owned = {name: ds for name, ds in loaded.collaboration.datasets.items() if ds.owner == party}
        outbox = generated_at / party / "outbox"
        prepared, setup = home_psi.prepare(loaded, party, keys, {n: generated_at / party / n / f"{n}.csv" for n in owned}, outbox)
        for item in prepared:
            target = runtime.settings.landing / c / party / item.dataset / item.output.name
            target.parent.mkdir(parents=True, exist_ok=True)
            item.output.replace(target)
        psi_folder = runtime.settings.landing / c / party / "_psi"
        psi_folder.mkdir(parents=True, exist_ok=True)
        setup.replace(psi_folder / setup.name)
        out.print(f"{party} (at home, {generated_at / party}): tokenised {', '.join(owned)} and wrote its setup message; no identifier or key left its folder")
    for party in loaded.parties():
        if loaded.at_home(party):
            continue
        for name, ds in loaded.collaboration.datasets.items():
            source = generated_at / party / name / f"{name}.csv"
            if ds.owner == party and source.exists():
                target = runtime.settings.landing / c / party / name / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def _demo_home_respond(runtime: Any, loaded: Any, generated_at: Path) -> None:
    """The home parties' second half, run locally: answer the operator's requests (`dcr psi respond`)."""
    from .lib import home_psi

    c = loaded.name
    for party in loaded.collaboration.matching.home_parties:
        keys = home_psi.load_keys(generated_at / f"{party}.key")
        for request in sorted((runtime.settings.exports / c / party / "psi").glob(f"*request*{home_psi.SUFFIX}")):
            answer = home_psi.respond(keys, request, c, party, runtime.settings.landing / c / party / "_psi")
            out.print(f"{party} (at home) answered {request.name} -> {answer.name}")


def _run_collaboration(defs: Any, loaded: Any, params: dict[str, dict[str, str]] | None = None, until_waiting: bool = False) -> dict[str, Any]:
    from .runner import analysis_run_config, collaboration_keys, materialize

    keys = collaboration_keys(defs, loaded.name)
    with out.status(f"materializing {len(keys)} assets of {loaded.name} through Dagster..."):
        outcome = materialize(
            defs, keys, instance=_instance(), run_config=analysis_run_config(loaded.name, params or {}), stdout_log=_run_log()
        )
    if not outcome.success and until_waiting and "waiting for the PSI answer" in (outcome.failure or ""):
        out.print(f"run {outcome.run_id} stopped at matching: {outcome.failure}", markup=False)
        return {}
    if not outcome.success:
        fail(f"run {outcome.run_id} failed: {outcome.failure}")
    out.print(f"run {outcome.run_id}: {len(outcome.metadata)} assets materialized (event log: `make ui` or `dcr audit {loaded.name}`)")
    return outcome.metadata


def _release_all(defs: Any, loaded: Any) -> None:
    """Release every approved query with its default parameters (what `dcr demo` asks for)."""
    from .runner import materialize, release_keys

    keys = release_keys(defs, loaded.name)
    if not keys:
        return
    with out.status(f"releasing {len(keys)} approved quer{'y' if len(keys) == 1 else 'ies'} through Dagster..."):
        outcome = materialize(defs, keys, instance=_instance(), stdout_log=_run_log())
    if not outcome.success:
        fail(f"run {outcome.run_id} failed: {outcome.failure}")
    for key, meta in outcome.metadata.items():
        if meta.get("cached"):
            out.print(f"{key}: identical release found (same query, parameters and data versions): stored result returned, no budget charged")


def _print_release(runtime: Any, loaded: Any, query_name: str, release_id: str | None = None) -> None:
    from .lib import naming
    from .lib.database import connect
    from .services.release import consumer_budget
    from .store import results
    from .store.ledger import budget_status

    query = loaded.queries[query_name]
    schema = naming.results_schema(loaded.name)
    with connect(runtime.warehouse.url()) as conn:
        stored = results.latest_release(conn, loaded.name, query_name, release_id)
        if stored is None:
            out.print(f"{query_name}: nothing released yet")
            return
        thresholded = query.spec.rule == "threshold"
        status = None if thresholded else budget_status(conn, schema, consumer_budget(loaded, query.spec.consumer))
    rid, rows, epsilon, params = stored.release_id, stored.rows, stored.epsilon, stored.params
    dims = list(query.spec.dimensions)
    metrics = list(query.spec.metrics)
    table = Table(title=f"{loaded.name}/{query_name}, release {rid}, params {json.dumps(params)}", title_justify="left")
    for d in dims:
        table.add_column(d)
    for m in metrics:
        table.add_column(m if thresholded else f"{m} (95% CI)", justify="right")
    cells: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        cells.setdefault(tuple(r[d] for d in dims), {})[r["metric"]] = r
    for key, by_metric in cells.items():
        values = []
        for m in metrics:
            cell = by_metric.get(m)
            if cell is None or cell["value"] is None:
                values.append("-")
            elif cell["ci_low"] is None:
                values.append(f"{cell['value']:,.1f}")
            else:
                values.append(f"{cell['value']:,.0f}  [{cell['ci_low']:,.0f}, {cell['ci_high']:,.0f}]")
        table.add_row(*key, *values)
    out.print(table)
    if status is None:
        out.print(f"threshold rule: exact values, groups with fewer than {query.spec.min_distinct_units} distinct people removed; no budget charged")
        return
    out.print(
        f"epsilon of this release: {epsilon:.3g}; {query.spec.consumer} has spent {status.spent:.3g} "
        f"and has {status.remaining:.3g} of {status.total:.3g} left"
        + (f" (rolling {status.period_days}-day window)" if status.period_days else ""),
        soft_wrap=True,
    )


def _release_rows(runtime: Any, loaded: Any, query_name: str, release_id: str) -> list[dict[str, Any]]:
    from .lib.database import connect
    from .store import results

    with connect(runtime.warehouse.url()) as conn:
        return results.release_rows(conn, loaded.name, release_id)


def _print_releases(runtime: Any, loaded: Any) -> None:
    for query_name in loaded.queries:
        _print_release(runtime, loaded, query_name)


# --- policy ------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Lint and inspect collaboration policy files."""


@policy.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def policy_check(path: Path | None) -> None:
    """Check every collaboration under PATH (default: policies/); exit 2 on any mistake.

    \b
    Example:
      dcr policy check policies/demo
    """
    from .lib.policy import check_policies
    from .lib.settings import Settings

    root = path or Settings.from_env().policies
    loaded, issues = check_policies(root)
    for issue in issues:
        err.print(f"error: {issue}", markup=False, soft_wrap=True)
    for collab in loaded:
        out.print(f"ok: {collab.name} ({len(collab.collaboration.datasets)} datasets, {len(collab.queries)} queries)")
    if issues:
        sys.exit(2)


@policy.command("render")
@click.argument("collab")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder to write the models into (replaced).")
def policy_render(collab: str, out_dir: Path) -> None:
    """Write the dbt models COLLAB's policy generates, for review (the demo's are kept in dbt_project/golden/).

    \b
    Example:
      dcr policy render demo --out dbt_project/golden/demo && git diff dbt_project/golden
    """
    from .lib import dbt_codegen
    from .lib.policy import PolicyError, load_collaboration
    from .lib.settings import Settings

    folder = Settings.from_env().policies / collab
    if not (folder / "collaboration.yaml").is_file():
        fail(f"no collaboration {collab!r} under {folder.parent} (expected {folder / 'collaboration.yaml'})", 2)
    try:
        loaded = load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]) + (f" (and {len(exc.issues) - 1} more; run `dcr policy check`)" if len(exc.issues) > 1 else ""), 2)
    files = dbt_codegen.render(loaded)
    shutil.rmtree(out_dir, ignore_errors=True)
    dbt_codegen.write_rendered(out_dir, files)
    out.print(f"{len(files)} files written to {out_dir}", markup=False)


@policy.command("hash")
@click.argument("collab")
def policy_hash(collab: str) -> None:
    """Print the SHA-256 each data owner approves for every query of COLLAB.

    \b
    Example:
      dcr policy hash demo
    """
    from .lib.policy import PolicyError
    from .lib.policy.loader import query_hash
    from .lib.settings import Settings

    folder = Settings.from_env().policies / collab / "queries"
    if not folder.is_dir():
        fail(f"no queries folder {folder}", 2)
    for spec_path in sorted(folder.glob("*.yaml")):
        try:
            out.print(f"{spec_path.stem}  {query_hash(spec_path)}")
        except PolicyError as exc:
            fail(str(exc.issues[0]), 2)


@policy.command("approve")
@click.argument("collab")
@click.option("--as", "member", required=True, help="The member approving (a member that provides data).")
def policy_approve(collab: str, member: str) -> None:
    """Approve, as MEMBER, the current hash of every query of COLLAB and what protects MEMBER's data.

    Writes MEMBER's entries under `approvals:` in collaboration.yaml and
    protections/MEMBER.json; review the change in git like any other.

    \b
    Example:
      dcr policy approve demo --as retailer
    """
    from .lib.policy import PolicyError
    from .lib.policy.approve import NothingToApprove, approve
    from .lib.settings import Settings

    folder = Settings.from_env().policies / collab
    if not (folder / "collaboration.yaml").is_file():
        fail(f"no collaboration {collab!r} under {folder.parent}", 2)
    try:
        done = approve(folder, member)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    except NothingToApprove as exc:
        fail(str(exc), 2)
    for name, digest in done.queries.items():
        out.print(f"{name}: {member} approves sha256 {digest}")
    out.print(f"protections of {member}'s data: sha256 {done.protections_sha256} ({done.protections_path})")


# --- stages ------------------------------------------------------------------------


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
    from .lib import naming
    from .runner import ingest_run_config, materialize

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    ds = loaded.collaboration.datasets.get(dataset)
    if ds is None:
        fail(f"{collab} declares no dataset {dataset!r} (datasets: {', '.join(loaded.collaboration.datasets)})", 2)
    if ds.owner != party:
        fail(f"dataset {dataset} belongs to {ds.owner}, not {party!r}", 2)
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    from .defs.collaboration import UPLOAD_SUFFIXES, landing_folder

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
    from .lib import naming
    from .lib.params import ParameterError, validate_params
    from .lib.privacy.mechanisms import plan_key_selection, plan_release, release_cost
    from .runner import materialize, release_run_config

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
        from .lib.chart import release_chart

        spec = approved.spec
        release_chart(_release_rows(runtime, loaded, query, meta["release_id"]), list(spec.dimensions), list(spec.metrics),
                      f"{collab}/{query} release {meta['release_id']}", chart)
        err.print(f"chart written to {chart}")


@main.group()
def query() -> None:
    """Ad-hoc SQL under the analysis rules."""


@query.command("check")
@click.argument("collab")
@click.option("--as", "party", required=True, help="The member running the query.")
@click.argument("sql_text", metavar="SQL")
def query_check(collab: str, party: str, sql_text: str) -> None:
    """Check ad-hoc SQL against every rule of the datasets it reads; run nothing.

    Prints "ok" with the tables and rules involved, or the refusal naming the
    rule and the offending part of the query (exit code 1).

    \b
    Example:
      dcr query check demo --as ad_network "select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers
        from impressions as i inner join customers as c on c.customer_email = i.user_email group by 1, 2"
    """
    from .lib import adhoc
    from .lib.policy import PolicyError, load_collaboration
    from .lib.settings import Settings

    settings = Settings.from_env()
    folder = settings.policies / collab
    if not folder.is_dir():
        fail(f"no collaboration {collab!r} under {settings.policies}", 2)
    try:
        loaded = load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    try:
        checked = adhoc.check(loaded, party, sql_text)
    except adhoc.QueryRefused as exc:
        fail(str(exc))
    out.print("ok")
    for line in checked.summary():
        out.print(f"  {line}", markup=False)


@query.command("run")
@click.argument("collab")
@click.option("--as", "party", required=True, help="The member running the query.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.argument("sql_text", metavar="SQL")
def query_run(collab: str, party: str, fmt: str, sql_text: str) -> None:
    """Check, rewrite and run ad-hoc SQL through Dagster; print the thresholded result.

    Every run is recorded in the event log, refused or not (`dcr audit`).

    \b
    Example:
      dcr query run demo --as ad_network "select c.loyalty_tier, count(distinct c.customer_email) as buyers,
        round(avg(c.lifetime_value), 2) as avg_value from impressions as i
        inner join customers as c on c.customer_email = i.user_email group by c.loyalty_tier"
    """
    import csv

    from .lib import naming
    from .lib.database import connect
    from .runner import ad_hoc_run_config, materialize
    from .services import adhoc as adhoc_service

    runtime = _runtime()
    _collaboration(runtime, collab)  # a policy mistake or unknown name stops here, exit 2
    defs = _definitions(runtime)
    with err.status("checking and running the query through Dagster..."):
        outcome = materialize(defs, [naming.ad_hoc_key(collab)], instance=_instance(), run_config=ad_hoc_run_config(collab, party, sql_text),
                              stdout_log=_run_log())
    if not outcome.success:
        fail(outcome.failure or "the query failed")
    with connect(runtime.warehouse.url()) as conn:
        result = adhoc_service.stored_result(conn, collab, party, outcome.run_id)
    columns, rows = result.columns, result.rows
    if fmt == "json":
        out.print_json(data={"run_id": outcome.run_id, "columns": columns, "rows": rows,
                             "suppressed_rows": result.suppressed, "suppressed_because": result.reasons})
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = Table(title=f"{collab}: ad-hoc query of {party} (run {outcome.run_id[:8]})")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
        out.print(table)
        meta = outcome.metadata.get("/".join(naming.ad_hoc_key(collab)), {})
        if meta.get("min_distinct_units"):
            out.print(f"rows with fewer than {meta['min_distinct_units']} distinct people were removed")
        if result.suppressed:
            out.print(f"{result.suppressed} row{'s' if result.suppressed != 1 else ''} withheld by the difference check: "
                      + "; ".join(result.reasons), markup=False)


@main.command()
@click.argument("collab")
@click.option("--consumer", help="Only this consumer's budget.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def budget(collab: str, consumer: str | None, fmt: str) -> None:
    """Show each consumer's privacy budget, how many more releases fit, and who spends on each owner's data.

    \b
    Example:
      dcr budget demo --consumer ad_network
    """
    from .lib import naming
    from .lib.database import connect
    from .lib.privacy.mechanisms import plan_key_selection, plan_release, release_cost
    from .store import ledger, results

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    schema = naming.results_schema(collab)
    budgets = [b for b in loaded.collaboration.budgets if consumer in (None, b.consumer)]
    if consumer and not budgets:
        fail(f"{collab} has no budget for {consumer!r}", 2)
    costs = {q.name: release_cost(plan_release(q.spec), plan_key_selection(q.spec)) for q in loaded.queries.values() if q.spec.rule == "dp"}
    report: dict[str, Any] = {"consumers": [], "owners": {}}
    with connect(runtime.warehouse.url()) as conn:
        for b in budgets:
            s = ledger.budget_status(conn, schema, b)
            fits = {
                q: int((s.remaining + 1e-12) // eps) if eps else None
                for q, (eps, delta) in costs.items()
                if loaded.queries[q].spec.consumer == b.consumer and (delta == 0 or delta <= s.delta_remaining)
            }
            report["consumers"].append({
                "consumer": b.consumer, "epsilon": s.total, "spent": s.spent, "remaining": s.remaining,
                "delta": s.delta_total, "delta_spent": s.delta_spent, "period_days": s.period_days,
                "refreshes_at": s.refreshes_at.isoformat() if s.refreshes_at else None, "releases_that_fit": fits,
            })
        spent_rows = results.spending(conn, collab)
    owners_of = {q.name: sorted({loaded.collaboration.datasets[d].owner for d in q.datasets}) for q in loaded.queries.values()}
    for who, query_name, count, total in spent_rows:
        for owner in owners_of.get(query_name, []):
            report["owners"].setdefault(owner, []).append({"consumer": who, "query": query_name, "releases": count, "epsilon": total})
    if fmt == "json":
        out.print_json(data=report)
        return
    table = Table(title=f"privacy budget of {collab}", title_justify="left")
    for column in ("consumer", "epsilon", "spent", "remaining", "delta left", "period", "refreshes at", "releases that still fit"):
        table.add_column(column)
    for c in report["consumers"]:
        fitting = ", ".join(f"{q}: {n}" for q, n in c["releases_that_fit"].items()) or "-"
        table.add_row(
            c["consumer"], f"{c['epsilon']:g}", f"{c['spent']:.4g}", f"{c['remaining']:.4g}", f"{c['delta'] - c['delta_spent']:.3g}",
            f"{c['period_days']} days" if c["period_days"] else "none", (c["refreshes_at"] or "-")[:16], fitting,
        )
    out.print(table)
    owners = Table(title="spending on each owner's data (owners see who spends)", title_justify="left")
    for column in ("data owner", "consumer", "query", "releases", "epsilon"):
        owners.add_column(column)
    for owner, entries in sorted(report["owners"].items()):
        for e in entries:
            owners.add_row(owner, e["consumer"], e["query"], str(e["releases"]), f"{e['epsilon']:.4g}")
    out.print(owners)


@main.command()
@click.argument("collab")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Only entries at or after this date (UTC).")
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl", "csv"]), default="table", show_default=True)
@click.option("--party", help="Only entries that touch this member's data (what a party may export).")
@click.option("--verify", is_flag=True, help="Check the audit chain against the tables members read and the event log; exit 1 on any problem.")
@click.option("--anchor", "anchors", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="With --verify: a chain head a party saved (the .anchor.json next to every export); repeatable.")
@click.option("--head", "show_head", is_flag=True, help="Print the chain's current head as JSON, for a party to keep.")
def audit(collab: str, since: Any, fmt: str, party: str | None, verify: bool, anchors: tuple[Path, ...], show_head: bool) -> None:
    """Export COLLAB's audit trail from Dagster's event log, or verify that it was not tampered with.

    The audit chain covers releases (rows as stored in the releases and results
    tables), budget charges, ad-hoc runs (accepted and refused) and each policy
    version applied. Every export carries the chain's head; a party that keeps
    one can prove later that history up to it was not rewritten.

    \b
    Examples:
      dcr audit demo --since 2026-11-01 --format jsonl > audit.jsonl
      dcr audit demo --party retailer --format csv
      dcr audit demo --verify --anchor exports/demo/retailer/campaign_reach/<release>.anchor.json
      dcr audit demo --head > demo-head.json
    """
    import csv
    import datetime as dt

    from .defs import audit as trail
    from .lib.database import connect

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    if party is not None and party not in loaded.collaboration.members:
        fail(f"{collab} has no member {party!r} (members: {', '.join(loaded.collaboration.members)})", 2)
    instance = _instance()
    if show_head:
        from .lib import naming
        from .store import audit_chain

        with connect(runtime.warehouse.url()) as conn:
            head = audit_chain.head(conn, naming.results_schema(collab), collab)
        out.print_json(data=None if head is None else {"collaboration": head.collaboration, "seq": head.seq, "chain_sha256": head.chain_sha256})
        return
    if verify:
        from .lib.audit import Anchor

        saved = []
        for path in anchors:
            try:
                saved.append(Anchor.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                fail(f"anchor {path}: not a chain head saved from an export ({exc.__class__.__name__}: {exc})", 2)
        for anchor in saved:
            if anchor.collaboration != collab:
                fail(f"anchor {anchor.collaboration}/{anchor.seq} belongs to collaboration {anchor.collaboration}, not {collab}", 2)
        with connect(runtime.warehouse.url()) as conn:
            recovered = trail.reconcile(instance, conn, loaded)
            problems = trail.verify(instance, conn, loaded, saved)
        for rid in recovered:
            err.print(f"note: release {rid} was committed by a run that stopped before recording its event; the event was added, marked recovered",
                      markup=False, soft_wrap=True)
        for problem in problems:
            err.print(f"error: {problem}", markup=False, soft_wrap=True)
        if problems:
            sys.exit(1)
        out.print(f"ok: the audit chain of {collab} is intact, matches the tables members read and the Dagster event log"
                  + (f", and {len(saved)} saved head(s)" if saved else ""))
        return
    entries = trail.entries(instance, loaded, since=since.replace(tzinfo=dt.UTC) if since else None, party=party)
    if fmt == "jsonl":
        for entry in entries:
            sys.stdout.write(json.dumps(entry, default=str) + "\n")
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["time", "kind", "asset", "run_id", "user", "metadata"])
        for e in entries:
            writer.writerow([e["time"], e["kind"], e["asset"], e["run_id"], e["user"], json.dumps(e["metadata"], default=str, sort_keys=True)])
        return
    table = Table(title=f"audit trail of {collab}" + (f" touching {party}" if party else "") + " (Dagster event log)", title_justify="left")
    for column in ("time (UTC)", "kind", "asset", "run", "user", "details"):
        table.add_column(column)
    keep = ("version", "row_count", "rows_staged", "matched", "release_id", "epsilon_charged", "epsilon_remaining", "cached", "receivers", "message")
    for e in entries:
        details = ", ".join(f"{k}={e['metadata'][k]}" for k in keep if k in e["metadata"])
        table.add_row(e["time"][:19], e["kind"], e["asset"], e["run_id"][:8], e["user"], details)
    out.print(table)


@main.command()
@click.argument("collab")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def overlap(collab: str, fmt: str) -> None:
    """Print what members learn of the number of shared people (matching.overlap_release).

    \b
    With overlap_release: dp, each new cross-reference releases the count
    with discrete Laplace noise and a 95% interval; with withheld, nothing.
    Example:
      dcr overlap demo_home
    """
    runtime = _runtime()
    _print_overlap(runtime, _collaboration(runtime, collab), fmt)


def _print_overlap(runtime: Any, loaded: Any, fmt: str = "table") -> None:
    from .lib.database import connect
    from .store import results

    collab = loaded.name
    mode = loaded.collaboration.matching.overlap_release
    if mode == "withheld":
        if fmt == "json":
            out.print_json(data={"collaboration": collab, "overlap_release": "withheld", "releases": []})
        else:
            out.print(f"{collab}: the overlap is withheld by policy (matching.overlap_release: withheld)")
        return
    with connect(runtime.warehouse.url()) as conn:
        rows = [(r.release_id, r.matched_people, r.ci_low, r.ci_high) for r in results.overlap_releases(conn, collab)]
    if fmt == "json":
        out.print_json(data={"collaboration": collab, "overlap_release": mode,
                             "releases": [{"release_id": r[0], "matched_people": r[1], "ci_low": r[2], "ci_high": r[3]} for r in rows]})
        return
    if not rows:
        out.print(f"{collab}: no overlap released yet (run the matching stage)")
        return
    if mode == "exact":
        table_out = Table(title=f"shared people in {collab} (exact: the analysis rules let members count them)", title_justify="left")
    else:
        table_out = Table(title=f"shared people in {collab} (DP, epsilon {loaded.collaboration.matching.overlap_epsilon} each)", title_justify="left")
    for column in ("release", "matched people", "95% interval"):
        table_out.add_column(column)
    for rid, value, low, high in rows:
        table_out.add_row(rid, f"{value:,.0f}", "exact" if low is None else f"[{low:,.0f}, {high:,.0f}]")
    out.print(table_out)


@main.group()
def psi() -> None:
    """A party's half of matching, on its own machine (for parties listed in matching.home_parties).

    \b
    The party keeps its identifiers and keys; it hands the operator files:
      dcr psi keygen --out ad_network.key
      dcr psi prepare demo_home --party ad_network --key ad_network.key \\
          --dataset impressions=impressions.csv --out outbox/
      (upload outbox/impressions.csv as usual, give the operator outbox/ad_network-setup.dcrpsi)
      dcr psi respond demo_home --party ad_network --key ad_network.key \\
          --request ad_network-request-<id>.dcrpsi --out outbox/
    """


def _policy_only(collab: str, policies: Path | None) -> Any:
    """A collaboration's policy without the database: these commands run on a party's own machine."""
    from .lib.policy import PolicyError, load_collaboration
    from .lib.settings import Settings

    folder = (policies or Settings.from_env().policies) / collab
    if not folder.is_dir():
        fail(f"no collaboration {collab!r} under {folder.parent}", 2)
    try:
        return load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)


def _home_party(loaded: Any, party: str) -> None:
    if not loaded.at_home(party):
        fail(f"{party!r} is not listed in matching.home_parties of {loaded.name} (policies/{loaded.name}/collaboration.yaml)", 2)


@psi.command("keygen")
@click.option("--out", "path", required=True, type=click.Path(path_type=Path), help="Key file to create (owner-only permissions).")
def psi_keygen(path: Path) -> None:
    """Create a party's key file: its token (HMAC) key and its PSI key. Keep it; never send it."""
    from .lib import home_psi

    try:
        home_psi.generate_keys(path)
    except FileExistsError:
        fail(f"{path} exists; keys are not overwritten (tokens would change)", 2)
    out.print(f"wrote {path} (mode 600)")


@psi.command("prepare")
@click.argument("collab")
@click.option("--party", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", "datasets", multiple=True, required=True, metavar="NAME=PATH", help="One of the party's datasets and its file; repeatable.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the tokenised uploads and the setup message.")
@click.option("--policies", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Policy folder (default: DCR_POLICIES or policies/).")
def psi_prepare(collab: str, party: str, key_path: Path, datasets: tuple[str, ...], out_dir: Path, policies: Path | None) -> None:
    """Tokenise the party's files and write its PSI setup message, all on this machine.

    Identifiers are normalised as docs/identifiers.md says and replaced by
    HMAC tokens under the party's key; rows whose identifier cannot be
    normalised are dropped and counted. Nothing is sent anywhere.
    """
    from .lib import home_psi

    loaded = _policy_only(collab, policies)
    _home_party(loaded, party)
    files = {}
    for item in datasets:
        name, sep, path = item.partition("=")
        if not sep or not path:
            fail(f"--dataset {item!r}: expected NAME=PATH", 2)
        files[name] = Path(path)
    try:
        prepared, setup = home_psi.prepare(loaded, party, home_psi.load_keys(key_path), files, out_dir)
    except (home_psi.MessageError, OSError) as exc:
        fail(str(exc), 2)
    for done in prepared:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(done.rejected.items())) or "none"
        out.print(f"{done.dataset}: {done.rows_out:,} of {done.rows_in:,} rows tokenised -> {done.output} (dropped: {dropped})")
    out.print(f"setup message: {setup} (give it to the operator; upload the tokenised files as usual)")


@psi.command("respond")
@click.argument("collab")
@click.option("--party", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--request", "request_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def psi_respond(collab: str, party: str, key_path: Path, request_path: Path, out_dir: Path) -> None:
    """Answer the operator's PSI request with the party's key; the answer goes back to the operator."""
    from .lib import home_psi

    try:
        answer = home_psi.respond(home_psi.load_keys(key_path), request_path, collab, party, out_dir)
    except home_psi.MessageError as exc:
        fail(str(exc), 2)
    out.print(f"response: {answer} (give it to the operator)")


@main.group()
def db() -> None:
    """The database in use."""


@db.command("url")
def db_url() -> None:
    """Print the connection URL of the clean-room database (password hidden).

    \b
    Example:
      DCR_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/cleanroom dcr db url
    """
    out.print(_runtime().warehouse.redacted(), markup=False, soft_wrap=True)


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL of this deployment (DCR_HOME); no effect on an external database.

    \b
    Example:
      dcr db stop && rm -rf .dcr
    """
    from .lib.database import stop_embedded
    from .lib.settings import Settings

    home = Settings.from_env().home
    out.print("embedded PostgreSQL stopped" if stop_embedded(home) else f"no embedded PostgreSQL running under {home}")


@db.command("migrate")
@click.option("--status", "show_status", is_flag=True, help="Only list the migrations already applied.")
def db_migrate(show_status: bool) -> None:
    """Apply the pending schema migrations (dcr_pipelines/store/migrations) to every collaboration's schemas.

    \b
    Each store function also applies its own scope's pending migrations on
    first use; run this before a deployment to do it all at once.
    Examples:
      dcr db migrate
      dcr db migrate --status
    """
    from .lib import naming
    from .lib.database import connect
    from .lib.policy import check_policies
    from .lib.settings import Settings
    from .store import migrations

    runtime = _runtime()
    with connect(runtime.warehouse.url()) as conn:
        if not show_status:
            loaded, _ = check_policies(Settings.from_env().policies)
            names = sorted(lc.name for lc in loaded)
            try:
                applied = migrations.migrate(conn, {"results": [naming.results_schema(c) for c in names],
                                                    "analysis": [naming.analysis_schema(c) for c in names],
                                                    "matching": [naming.matching_schema(c) for c in names]})
            except migrations.MigrationError as exc:
                fail(str(exc), 2)
            for a in applied:
                out.print(f"applied {a.scope} {a.version:04d}_{a.name}", markup=False)
            out.print(f"schema up to date ({len(applied)} migration(s) applied now)")
            return
        for scope_name, version, name, applied_at in migrations.status(conn):
            out.print(f"{scope_name}\t{version:04d}_{name}\t{applied_at[:19]}", markup=False, soft_wrap=True)


@db.command("roles")
@click.argument("collab")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def db_roles(collab: str, fmt: str) -> None:
    """Print the role x schema privilege matrix of COLLAB, read back from the database.

    \b
    Cells: write (create/insert), read (select on every table), read N/M
    (select on some tables), usage (schema only), - (nothing).
    Example:
      dcr db roles demo
    """
    from .lib.database import connect
    from .store import access

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    with connect(runtime.warehouse.url()) as conn:
        grid = access.matrix(conn, loaded)
    schemas = access.schemas(loaded)
    if fmt == "json":
        out.print_json(data={r: {s: grid[r][s].cell() for s in schemas} for r in grid})
        return
    table = Table(title=f"roles x schemas of {collab} (from the database)", title_justify="left")
    table.add_column("role")
    for schema in schemas:
        table.add_column(schema.removeprefix(f"{collab}_"))
    for role, row in grid.items():
        table.add_row(role.removeprefix(f"dcr_{collab}_"), *(row[s].cell() for s in schemas))
    out.print(table)


@main.command()
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui(port: int, host: str) -> None:
    """Start the Dagster UI (dg dev) on the same database.

    \b
    Example:
      dcr ui --port 3000
    """
    runtime = _runtime()
    _definitions(runtime)  # prepares the manifest and development secrets before the code server starts
    from .lib.settings import PROJECT_ROOT

    dg_bin = Path(sys.executable).with_name("dg")
    out.print(f"Dagster UI on http://{host}:{port} (Ctrl-C to stop); storage: {runtime.dagster_url.split('?')[0]}", markup=False)
    os.chdir(PROJECT_ROOT)
    os.execv(str(dg_bin), [str(dg_bin), "dev", "--host", host, "--port", str(port)])  # noqa: S606 (our own dg, fixed arguments)


if __name__ == "__main__":
    main()
