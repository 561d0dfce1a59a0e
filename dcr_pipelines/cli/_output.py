"""`--format table|json|csv`, with one meaning in every listing command.

- ``table`` is for people: a table (or several), then notes.
- ``json`` is one object: ``columns``, ``rows`` (one object per result row, the rows the table shows), ``withheld_rows``
  where a result can withhold rows (the count, and ``withheld_because``), the notes, and fields about the whole result
  (a release's id, the epsilon charged).
- ``csv`` is the rows only, one line per result row under a header of ``columns``; what a row cannot carry (withheld
  rows, notes, the epsilon charged) goes to stderr as ``note:`` lines, so a pipe gets clean CSV and nothing is silent.
- ``jsonl`` (accepted, not listed) is ``json``'s rows one per line, for long listings such as the audit trail.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
from rich.table import Table

from ._common import err, out

FORMATS = ("table", "json", "csv")
_HIDDEN = ("jsonl",)


class _Format(click.Choice):
    """table|json|csv in --help and in the error; jsonl is accepted too (one JSON row per line)."""

    def __init__(self) -> None:
        super().__init__(FORMATS, case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.lower() in _HIDDEN:
            return value.lower()
        return super().convert(value, param, ctx)


def format_option() -> Any:
    return click.option("--format", "fmt", type=_Format(), default="table", show_default=True,
                        help="table, json (one object: rows, one per result row, and what they cannot say) or csv (the rows; "
                             "withheld rows and notes on stderr).")


@dataclass
class Listing:
    """What a listing command prints, before it is formatted."""

    columns: list[str]
    rows: list[dict[str, Any]]
    title: str = ""
    notes: list[str] = field(default_factory=list)
    withheld: int | None = None  # rows the result had but does not show; None: this result never withholds rows
    withheld_because: list[str] = field(default_factory=list)
    about: dict[str, Any] = field(default_factory=dict)  # json only: fields about the whole result
    right: Sequence[str] = ()  # table: right-aligned columns
    cell: Callable[[str, Any], str] | None = None  # table: how a value is shown

    def withheld_note(self) -> str | None:
        if not self.withheld:
            return None
        reasons = "; ".join(self.withheld_because)
        return f"{self.withheld} row{'s' if self.withheld != 1 else ''} withheld" + (f": {reasons}" if reasons else "")


def shown(value: Any) -> str:
    """A value in a table cell: blank for null, 7 significant digits for a float, thousands separators for an int."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.7g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def text_only(fmt: str, what: str) -> None:
    """A mode of a listing command that prints a plan or a verdict, not rows: --format other than table is a usage mistake."""
    if fmt != "table":
        raise click.UsageError(f"{what} prints text, not rows: drop --format {fmt}")


def emit(listing: Listing, fmt: str, table: Callable[[], None] | None = None) -> None:
    """Print ``listing`` as ``fmt``; ``table`` prints the table form (and its notes) when the command has its own (several
    tables, cells shown its way)."""
    note = listing.withheld_note()
    if fmt == "json":
        rows = [{**{c: row[c] for c in listing.columns if c in row}, **row} for row in listing.rows]  # keys in the columns' order
        body: dict[str, Any] = {**listing.about, "columns": listing.columns, "rows": rows}
        if listing.withheld is not None:
            body |= {"withheld_rows": listing.withheld, "withheld_because": listing.withheld_because}
        body["notes"] = listing.notes
        sys.stdout.write(json.dumps(body, default=str, indent=2) + "\n")
        return
    if fmt == "jsonl":
        for row in listing.rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=listing.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: _csv_value(row.get(c)) for c in listing.columns} for row in listing.rows)
    if fmt in ("csv", "jsonl"):
        for line in ([note] if note else []) + listing.notes:
            err.print(f"note: {line}", markup=False, soft_wrap=True)
        return
    if table is not None:  # the command's own tables print its notes their way
        table()
    else:
        print_table(listing)
    for line in ([note] if note else []) + ([] if table is not None else listing.notes):
        out.print(line, markup=False, soft_wrap=True)


def print_table(listing: Listing, headers: Mapping[str, str] | None = None) -> None:
    cell = listing.cell or (lambda _column, value: shown(value))
    grid = Table(title=listing.title or None, title_justify="left")
    for column in listing.columns:
        grid.add_column((headers or {}).get(column, column), justify="right" if column in listing.right else "left")
    for row in listing.rows:
        grid.add_row(*(cell(c, row.get(c)) for c in listing.columns))
    out.print(grid)


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, sort_keys=True)
    return value
