"""A PNG chart of released values with their 95% intervals (looking beats reading)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def release_chart(rows: Sequence[Mapping[str, Any]], dimensions: Sequence[str], metrics: Sequence[str], title: str, path: Path) -> Path:
    """One panel per metric; bars per group of the first dimension, one colour per value of the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = dimensions[0], (dimensions[1] if len(dimensions) > 1 else None)
    xs = list(dict.fromkeys(str(r[first]) for r in rows))
    series = list(dict.fromkeys(str(r[second]) for r in rows)) if second else [""]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 1.3 * len(xs) * max(1, len(series)) / 2), 3.6 * len(metrics)), squeeze=False)
    width = 0.8 / len(series)
    for ax, metric in zip(axes[:, 0], metrics, strict=False):
        for j, s in enumerate(series):
            picked = {str(r[first]): r for r in rows if r["metric"] == metric and (second is None or str(r[second]) == s)}
            values = [picked[x]["value"] if x in picked and picked[x]["value"] is not None else 0.0 for x in xs]
            errors = [
                (picked[x]["value"] - picked[x]["ci_low"]) if x in picked and picked[x]["ci_low"] is not None else 0.0 for x in xs
            ]
            positions = [i + (j - (len(series) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(positions, values, width, yerr=errors, capsize=2, label=s or None)
        ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.axhline(0, color="black", linewidth=0.5)
        if second:
            ax.legend(title=second, fontsize="small", ncols=min(4, len(series)), loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, not over, the bars
    has_intervals = any(r.get("ci_low") is not None for r in rows)
    axes[0, 0].set_title(title + ("\n(bars: released values; whiskers: 95% intervals)" if has_intervals else "\n(exact values: no noise, no interval)"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
