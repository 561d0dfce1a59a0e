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


def format_value(kind: MetricKind, value: float | None, compact: bool = False) -> str:
    """A count is a whole number of people or rows (``251``, never ``251.0``); sums and averages keep two decimals.

    ``compact`` (the asset page, where a table must fit beside Dagster's panels): from 1,000 on, three significant
    digits with k, M or B (``2k``, ``12.3k``, ``1.24M``); amounts from 100 on without decimals (``557``), under 100 with
    three significant digits (``12.5``, ``0``)."""
    if value is None:
        return "-"
    if compact:
        size = abs(value)
        for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
            if size >= limit:
                return f"{value / limit:.3g}{suffix}"
        if kind not in COUNTS:
            return f"{value:,.0f}" if size >= 100 else f"{value:.3g}"
    if kind in COUNTS:
        return f"{round(value):,}"
    return f"{value:,.2f}"


def format_cell(kind: MetricKind, row: Mapping[str, Any] | None, compact: bool = False) -> str:
    """``value [low, high]`` with the 95% interval when the release has one; ``-`` for a group without a value."""
    if row is None or row.get("value") is None:
        return "-"
    text = format_value(kind, row["value"], compact)
    if row.get("ci_low") is not None and row.get("ci_high") is not None:
        text += f" [{format_value(kind, row['ci_low'], compact)}, {format_value(kind, row['ci_high'], compact)}]"
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


def release_table(spec: QuerySpec, rows: Sequence[Mapping[str, Any]], compact: bool = False) -> ReleaseTable:
    """One row per group, one column per metric (``value [95% interval]``), in the order the release stored them;
    ``compact`` shortens large values (see :func:`format_value`) and says so in the note."""
    dims, metrics = list(spec.dimensions), list(spec.metrics)
    thresholded = spec.rule == "threshold"
    cells: dict[tuple[str, ...], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault(tuple(str(r[d]) for d in dims), {})[str(r["metric"])] = r
    headers = dims + [m if thresholded or compact else f"{m} (95% interval)" for m in metrics]
    body = [[*key, *(format_cell(spec.metrics[m].aggregate, by.get(m), compact) for m in metrics)] for key, by in cells.items()]
    if thresholded:
        note = f"Threshold rule: exact values; groups with fewer than {spec.min_distinct_units} distinct people were removed. No noise, no epsilon."
    else:
        note = "Differentially private (opendp Laplace noise); in brackets, the 95% interval of each released value."
    if compact:
        note += (" Values are shortened to fit (three significant digits; k thousand, M million, B billion); "
                 "`dcr release` and the export files have them in full.")
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
