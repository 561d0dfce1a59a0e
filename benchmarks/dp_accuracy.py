"""Measured accuracy of the release mechanisms next to opendp's stated accuracy.

Prints and writes benchmarks/results/dp_accuracy.json: for a count of
distinct persons (discrete Laplace) and a clamped sum (Laplace) at several
epsilons, the 95th percentile of the absolute error over many releases, and
the 95% accuracy opendp states for the same scale.

    .venv/bin/python benchmarks/dp_accuracy.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from dcr_pipelines.lib.policy.models import QuerySpec
from dcr_pipelines.lib.privacy.mechanisms import add_noise, plan_release

RELEASES = 20_000
OUT = Path(__file__).parent / "results" / "dp_accuracy.json"


def spec(metric: dict, epsilon: float) -> QuerySpec:
    return QuerySpec.model_validate(
        {"consumer": "c", "receivers": ["c"], "dimensions": {"d": {"domain": ["x"]}}, "metrics": {"m": metric},
         "contribution": {"max_groups_per_unit": 1, "max_rows_per_group": 1}, "privacy": {"epsilon": epsilon}}
    )


def main() -> None:
    rows = []
    for name, metric in (("count_units", {"aggregate": "count_units"}), ("sum[0,300]", {"aggregate": "sum", "column": "v", "bounds": [0, 300]})):
        for epsilon in (0.1, 0.5, 1.0, 2.0):
            plan = plan_release(spec(metric, epsilon))[0]
            truth = 1000.0
            errors = np.abs(np.array(add_noise(plan, [truth] * RELEASES)) - truth)
            rows.append({
                "metric": name, "epsilon": epsilon, "sensitivity": plan.sensitivity, "scale": plan.scale,
                "p95_abs_error_measured": float(np.quantile(errors, 0.95)), "accuracy_95_stated_by_opendp": plan.accuracy,
                "releases": RELEASES,
            })
    for r in rows:
        print(f"{r['metric']:12s} eps {r['epsilon']:<4} p95 |error| measured {r['p95_abs_error_measured']:9.2f}   opendp 95% accuracy {r['accuracy_95_stated_by_opendp']:9.2f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.platform(), "cpus": __import__("os").cpu_count(), "results": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
