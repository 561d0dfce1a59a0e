"""`dcr query`: check and run ad-hoc SQL."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from ._common import _collaboration, _instance, _run_log, _runtime, err, fail, main, out


@main.group()
def query() -> None:
    """Ad-hoc SQL under the analysis rules."""


def _known_member(loaded: Any, party: str) -> None:
    """An unknown --as is a usage mistake (exit 2), not a refusal by the rules."""
    members = loaded.collaboration.members
    if party not in members:
        fail(f"{loaded.name} has no member {party!r} (members: {', '.join(members)}); give one of them with --as", 2)


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
    from ..lib import adhoc
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.settings import Settings

    settings = Settings.from_env()
    folder = settings.policies / collab
    if not folder.is_dir():
        fail(f"no collaboration {collab!r} under {settings.policies}", 2)
    try:
        loaded = load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    _known_member(loaded, party)
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

    from ..lib import naming
    from ..lib.database import connect
    from ..runner import ad_hoc_run_config, materialize
    from ..services import adhoc as adhoc_service

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)  # a policy mistake or unknown name stops here, exit 2
    _known_member(loaded, party)
    from ..defs.ad_hoc import ad_hoc_definitions

    defs = ad_hoc_definitions(loaded, runtime.warehouse.url())  # this collaboration's ad-hoc asset only: no dbt to load
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
