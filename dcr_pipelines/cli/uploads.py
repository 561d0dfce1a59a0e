"""`dcr uploads`: the upload queue of a collaboration (every file, its number, state and reason) and withdrawing a file."""

from __future__ import annotations

import click
from rich.table import Table

from ..lib.text import plural
from ._common import _collaboration, _instance, _runtime, fail, main, member_option, out
from ._output import Listing, emit, format_option


@main.group()
def uploads() -> None:
    """List a collaboration's uploads, or withdraw an appended file."""


@uploads.command("list")
@click.argument("collab")
@member_option("Only this member's uploads.", param="party")
@click.option("--dataset", help="Only this dataset's uploads.")
@click.option("--limit", default=50, show_default=True, help="The newest N uploads.")
@format_option()
def list_uploads(collab: str, party: str | None, dataset: str | None, limit: int, fmt: str) -> None:
    """Every upload of COLLAB, newest last: number, file, state, rows and the reason for a refusal.

    \b
    Example:
      dcr uploads list demo --dataset impressions
    """
    from ..defs.ingest import target
    from ..lib.database import connect
    from ..services import ingest as ingest_lib
    from ..store import uploads as queue

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    if dataset is not None and dataset not in loaded.collaboration.datasets:
        fail(f"{collab} declares no dataset {dataset!r} (datasets: {', '.join(loaded.collaboration.datasets)})", 2)
    with connect(runtime.warehouse.url()) as conn:
        rows = queue.listing(conn, collab, party, dataset, limit=limit)
    # What each dataset is now (a withdraw, an appended file or a changed contract makes a version no upload row shows),
    # and whether the staged data the answers read are that version yet.
    from ..defs import freshness

    with connect(runtime.warehouse.url()) as conn:
        stale = set(freshness.staged(_instance(), conn, loaded).stale)
        now = {name: ingest_lib.current_version(conn, target(loaded, name, runtime.settings.landing, runtime.warehouse.url()))
               for name, ds in sorted(loaded.collaboration.datasets.items()) if (party is None or ds.owner == party) and (dataset is None or name == dataset)}
    current = []
    for name, version in now.items():
        owner = loaded.collaboration.datasets[name].owner
        current.append({"party": owner, "dataset": name, "version": None if version is None else version.version,
                        "rows": None if version is None else version.row_count, "files": None if version is None else len(version.parts),
                        "staged": None if version is None else f"{owner}.{name}" not in stale})
    columns = ["upload", "party", "dataset", "file", "landed_at", "state", "version", "rows", "duplicate_rows", "dropped_rows", "reason"]
    listed = [{"upload": u.seq, "party": u.party, "dataset": u.dataset, "file": u.file_name, "landed_at": u.landed_at.isoformat(), "state": u.state,
               "version": u.version, "rows": u.row_count, "duplicate_rows": u.duplicate_rows, "dropped_rows": u.dropped_rows, "reason": u.reason}
              for u in rows]

    def tables() -> None:
        if not rows:
            out.print(f"{collab}: no uploads yet")
            return
        table = Table(title=f"{collab}: uploads (oldest first)", title_justify="left")
        for column in ("#", "party/dataset", "file", "landed", "state", "version", "rows", "duplicates", "reason"):
            table.add_column(column, justify="right" if column in ("#", "version", "rows", "duplicates") else "left")
        for u in rows:
            dups = "" if u.duplicate_rows is None else f"{u.duplicate_rows:,}" + (" dropped" if u.dropped_rows else "")
            table.add_row(str(u.seq), f"{u.party}/{u.dataset}", u.file_name, u.landed_at.strftime("%Y-%m-%d %H:%M:%S"), u.state,
                          "" if u.version is None else str(u.version), "" if u.row_count is None else f"{u.row_count:,}", dups, u.reason or "")
        out.print(table)
        grid = Table(title=f"{collab}: current data", title_justify="left")
        for column in ("party/dataset", "version", "rows", "files", "staged"):
            grid.add_column(column, justify="right" if column in ("version", "rows", "files") else "left")
        for c in current:
            if c["version"] is None:
                grid.add_row(f"{c['party']}/{c['dataset']}", "", "", "", "no upload yet")
                continue
            staged = "yes" if c["staged"] else f"not yet: answers refuse (stale data) until `dcr run {collab}`"
            grid.add_row(f"{c['party']}/{c['dataset']}", str(c["version"]), f"{c['rows']:,}", str(c["files"]), staged)
        out.print(grid)

    # One row per upload; what each dataset is now is the json's "current" (the table shows both).
    emit(Listing(columns, listed, about={"collaboration": collab, "current": current},
                 notes=["what each dataset is now (version, rows, staged or not) is the json's current field (the table shows it too)"]),
         fmt, table=tables)


@uploads.command()
@click.argument("collab")
@click.argument("party")
@click.argument("dataset")
@click.argument("upload", type=int)
def withdraw(collab: str, party: str, dataset: str, upload: int) -> None:
    """Remove the rows of appended file number UPLOAD from PARTY's DATASET (append mode): a new version without them.

    \b
    Example:
      dcr uploads withdraw demo ad_network impressions 7
    """
    from ..defs.ingest import partitions_name, target
    from ..lib.database import connect
    from ..services import ingest as ingest_lib

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    ds = loaded.collaboration.datasets.get(dataset)
    if ds is None or ds.owner != party:
        fail(f"{collab} declares no dataset {dataset!r} of {party!r}", 2)
    url = runtime.warehouse.url()
    t = target(loaded, dataset, runtime.settings.landing, url)
    try:
        with connect(url) as conn:
            version = ingest_lib.withdraw(conn, t, upload)
    except ingest_lib.UploadRejected as exc:
        fail(str(exc), 2)
    from ..defs import freshness
    from ..store import uploads as queue

    # The event log records the withdrawal: a materialization of the withdrawn file's partition whose data version is
    # the dataset's new content, which staging's provenance no longer matches (stale until it is rebuilt). Then the
    # partition goes.
    instance = _instance()
    freshness.record_version(instance, collab, dataset, version, party=party, partition=queue.partition_key(upload),
                             why=f"upload #{upload} withdrawn", withdrawn_upload=upload)
    instance.delete_dynamic_partition(partitions_name(collab, party, dataset), queue.partition_key(upload))
    out.print(f"{collab}/{party}/{dataset}: upload #{upload} withdrawn; version {version.version} has {plural(version.row_count, 'row')} "
              f"from {plural(len(version.parts), 'file')}; releases and queries refuse (stale data) until `dcr run {collab}` (or the landing "
              "sensor) rebuilds what read it")
