"""`dcr budget`, `dcr audit`, `dcr overlap`: what was spent, what happened, what members learn of the overlap."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ._common import _collaboration, _instance, _print_overlap, _runtime, err, fail, main, member_option, out
from ._output import Listing, emit, format_option, text_only


@main.command()
@click.argument("collab")
@member_option("Only this member's budget (the consumer that spends it).", param="consumer")
@format_option()
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="A member's credentials file (`dcr member add`): "
              "that member's own budget; or set DCR_MEMBER_URL.")
def budget(collab: str, consumer: str | None, fmt: str, credentials_path: Path | None) -> None:
    """Show each consumer's privacy budget, how many more releases fit, and who spends on each owner's data.

    \b
    Example:
      dcr budget demo --member ad_network
    """
    from .member import ask, credentials

    creds = credentials(credentials_path)
    if creds:
        if consumer:
            fail("--member is the operator's: a member login sees its own budget only", 2)
        report = ask(creds, collab, "budget", {}).answer
    else:
        from ..lib.database import connect
        from ..services import budget as budget_service

        runtime = _runtime()
        loaded = _collaboration(runtime, collab)
        if consumer and not any(b.consumer == consumer for b in loaded.collaboration.budgets):
            fail(f"{collab} has no budget for {consumer!r}", 2)
        with connect(runtime.warehouse.url()) as conn:
            report = budget_service.report(conn, loaded, consumer)
    columns = ["consumer", "epsilon", "spent", "remaining", "delta", "delta_spent", "period_days", "refreshes_at", "releases_that_fit"]
    rows = [{c: consumer_row[c] for c in columns} for consumer_row in report["consumers"]]

    def tables() -> None:
        table = Table(title=f"privacy budget of {collab}", title_justify="left")
        for column in ("consumer", "epsilon", "spent", "remaining", "delta left", "period", "refreshes at", "releases that still fit"):
            table.add_column(column)
        for c in rows:
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

    # One row per consumer; who spends on each owner's data is the json's "owners" (the table shows both).
    emit(Listing(columns, rows, about={"collaboration": collab, "owners": report["owners"]},
                 notes=["who spends on each owner's data is the json's owners field (the table shows it too)"]), fmt, table=tables)


@main.command()
@click.argument("collab")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help="Only entries at or after this date (UTC).")
@format_option()
@member_option("Only entries that touch this member's data (what a party may export).", param="party")
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
      dcr audit demo --since 2026-11-01 --format json > audit.json
      dcr audit demo --member retailer --format csv
      dcr audit demo --verify --anchor exports/demo/retailer/campaign_reach/<release>.anchor.json
      dcr audit demo --head > demo-head.json
    """
    import datetime as dt

    from ..defs import audit as trail
    from ..lib.database import connect

    if verify or show_head:
        text_only(fmt, "--verify" if verify else "--head")
    if anchors and not verify:
        fail("--anchor is a chain head to check: it takes --verify (dcr audit COLLAB --verify --anchor FILE)", 2)
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    if party is not None and party not in loaded.collaboration.members:
        fail(f"{collab} has no member {party!r} (members: {', '.join(loaded.collaboration.members)})", 2)
    instance = _instance()
    if show_head:
        from ..lib import naming
        from ..store import audit_chain

        with connect(runtime.warehouse.url()) as conn:
            head = audit_chain.head(conn, naming.results_schema(collab), collab)
        out.print_json(data=None if head is None else {"collaboration": head.collaboration, "seq": head.seq, "chain_sha256": head.chain_sha256})
        return
    if verify:
        from ..lib.audit import Anchor

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
            recovered, exported = trail.reconcile(instance, conn, loaded, runtime.settings.exports)
            problems = trail.verify(instance, conn, loaded, saved)
        for rid in recovered:
            err.print(f"note: release {rid} was committed by a run that stopped before recording its event; the event was added, marked recovered",
                      markup=False, soft_wrap=True)
        for rid in exported:
            err.print(f"note: release {rid} was committed by a run that stopped before writing its export files; they are written now",
                      markup=False, soft_wrap=True)
        for problem in problems:
            err.print(f"error: {problem}", markup=False, soft_wrap=True)
        if problems:
            sys.exit(1)
        out.print(f"ok: the audit chain of {collab} is intact, matches the tables members read and the Dagster event log"
                  + (f", and {len(saved)} saved head(s)" if saved else ""))
        return
    entries = trail.entries(instance, loaded, since=since.replace(tzinfo=dt.UTC) if since else None, party=party)
    columns = ["time", "kind", "asset", "run_id", "user", "metadata"]

    def table() -> None:
        grid = Table(title=f"audit trail of {collab}" + (f" touching {party}" if party else "") + " (Dagster event log)", title_justify="left")
        for column in ("time (UTC)", "kind", "asset", "run", "user", "details"):
            grid.add_column(column)
        keep = ("version", "row_count", "rows_staged", "matched", "release_id", "epsilon_charged", "epsilon_remaining", "cached", "receivers",
                "runner", "rows", "suppressed_rows", "message")
        for e in entries:
            details = ", ".join(f"{k}={e['metadata'][k]}" for k in keep if k in e["metadata"])
            grid.add_row(e["time"][:19], e["kind"], e["asset"], e["run_id"][:8], e["user"], details)
        out.print(grid)

    emit(Listing(columns, entries, about={"collaboration": collab, **({"member": party} if party else {})}), fmt, table=table)


@main.command()
@click.argument("collab")
@format_option()
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


@main.command("report")
@click.argument("collab")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder to write index.html, charts and the chain head into.")
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="Your credentials file (`dcr member add`): "
              "your own report, through your login; or set DCR_MEMBER_URL.")
@member_option("The operator, writing the report of a member: it shows only what this member may see.")
def member_report(collab: str, out_dir: Path, credentials_path: Path | None, member: str | None) -> None:
    """Write a member's own report of COLLAB as a static HTML page: its releases with charts and intervals, its budget,
    every query over its data (runner and SQL), its uploads and their validation, and the audit chain head to keep.

    \b
    Examples:
      dcr report demo --credentials retailer.json --out reports/retailer
      dcr report demo --member retailer --out reports/retailer
    """
    from .member import credentials, refuse_as

    creds = credentials(credentials_path)
    refuse_as(member, creds)
    if not creds and not member:
        raise click.UsageError("missing option '--credentials FILE' (a member's own login) or '--member' (the operator, for a member)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "index.html").is_file():
        fail(f"{out_dir} has files that are not a report; give an empty or new folder (nothing was written)", 2)
    if creds:
        _report_through_login(creds, collab, out_dir)
        return
    assert member is not None
    from ..defs import audit as trail
    from ..lib import member_report as page
    from ..lib.database import connect
    from ..services import member_report as gathered

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    if member not in loaded.collaboration.members:
        fail(f"{collab} has no member {member!r} (members: {', '.join(loaded.collaboration.members)})", 2)
    activity = trail.entries(_instance(), loaded, party=member)
    with connect(runtime.warehouse.url()) as conn:
        view = gathered.gather(conn, loaded, member, activity)
    try:
        written = page.write(view, loaded, out_dir)
    except OSError as exc:
        fail(f"{exc.filename or out_dir}: {exc.strerror or exc}; nothing usable was written (choose a writable folder)", 2)
    out.print(f"{collab}: report for {member} written to {written} ({len(view.releases)} release(s), {len(view.uploads)} upload(s))", markup=False)


def _report_through_login(creds: dict[str, str], collab: str, out_dir: Path) -> None:
    """The member's report, made by the operator's side from what the member may see and written here, file by file."""
    import base64
    from pathlib import PurePosixPath

    from .member import ask

    done = ask(creds, collab, "report", {})
    answer = done.answer or {}
    files = answer["files"] if isinstance(answer.get("files"), dict) else {}
    try:
        for name, data in sorted(files.items()):
            relative = PurePosixPath(str(name))
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                fail(f"the answer names a file outside the report folder ({name!r}); nothing more was written", 1)
            target = out_dir.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(str(data)))
    except OSError as exc:
        fail(f"{exc.filename or out_dir}: {exc.strerror or exc}; nothing usable was written (choose a writable folder)", 2)
    out.print(f"{collab}: report for {done.member} written to {out_dir / 'index.html'} ({answer.get('releases', 0)} release(s), "
              f"{answer.get('uploads', 0)} upload(s))", markup=False)
