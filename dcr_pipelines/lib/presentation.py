"""Released values as people read them: counts as integers, amounts with two decimals, intervals beside them.

One place for the CLI (`dcr release`), the results assets' previews in the Dagster UI and
the member report, so the three never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .policy.models import MetricKind, QuerySpec

COUNTS = (MetricKind.COUNT, MetricKind.COUNT_UNITS)


def format_value(kind: MetricKind, value: float | None) -> str:
    """A count is a whole number of people or rows (``251``, never ``251.0``); sums and averages keep two decimals."""
    if value is None:
        return "-"
    if kind in COUNTS:
        return f"{round(value):,}"
    return f"{value:,.2f}"


def format_cell(kind: MetricKind, row: Mapping[str, Any] | None) -> str:
    """``value [low, high]`` with the 95% interval when the release has one; ``-`` for a group without a value."""
    if row is None or row.get("value") is None:
        return "-"
    text = format_value(kind, row["value"])
    if row.get("ci_low") is not None and row.get("ci_high") is not None:
        text += f" [{format_value(kind, row['ci_low'])}, {format_value(kind, row['ci_high'])}]"
    return text


@dataclass(frozen=True)
class ReleaseTable:
    headers: list[str]
    rows: list[list[str]]
    note: str

    def markdown(self, limit: int = 200) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = ["| " + " | ".join(map(esc, self.headers)) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(map(esc, row)) + " |" for row in self.rows[:limit]]
        if len(self.rows) > limit:
            lines.append(f"\n{len(self.rows) - limit} more rows: `dcr release` or the export files have all of them.")
        return "\n".join(lines) + f"\n\n{self.note}\n"


def release_table(spec: QuerySpec, rows: Sequence[Mapping[str, Any]]) -> ReleaseTable:
    """One row per group, one column per metric (``value [95% interval]``), in the order the release stored them."""
    dims, metrics = list(spec.dimensions), list(spec.metrics)
    thresholded = spec.rule == "threshold"
    cells: dict[tuple[str, ...], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault(tuple(str(r[d]) for d in dims), {})[str(r["metric"])] = r
    headers = dims + [m if thresholded else f"{m} (95% interval)" for m in metrics]
    body = [[*key, *(format_cell(spec.metrics[m].aggregate, by.get(m)) for m in metrics)] for key, by in cells.items()]
    if thresholded:
        note = f"Threshold rule: exact values; groups with fewer than {spec.min_distinct_units} distinct people were removed. No noise, no epsilon."
    else:
        note = "Differentially private (opendp Laplace noise); in brackets, the 95% interval of each released value."
    return ReleaseTable(headers, body, note)


def release_records(dimensions: Sequence[str], metrics: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """A release as one record per group (what `--format json|csv` print): its dimensions, then each metric's value and,
    when the release has intervals, ``<metric>_ci_low`` and ``<metric>_ci_high``; the columns and the records."""
    intervals = any(r.get("ci_low") is not None for r in rows)
    columns = list(dimensions)
    for m in metrics:
        columns += [m, f"{m}_ci_low", f"{m}_ci_high"] if intervals else [m]
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        record = groups.setdefault(tuple(str(r[d]) for d in dimensions), {**{d: r[d] for d in dimensions}, **dict.fromkeys(columns[len(dimensions):])})
        metric = str(r["metric"])
        record[metric] = r.get("value")
        if intervals:
            record[f"{metric}_ci_low"], record[f"{metric}_ci_high"] = r.get("ci_low"), r.get("ci_high")
    return columns, list(groups.values())
