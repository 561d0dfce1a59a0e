"""Noise plans: sensitivity from the declared bounds, epsilon mapped by opendp, never over the query's epsilon."""

from __future__ import annotations

import math
import statistics

import pytest

from dcr_pipelines.lib.policy.models import QuerySpec
from dcr_pipelines.lib.privacy.mechanisms import add_noise, plan_release, release_cost


def _spec(metrics: dict, groups: int = 2, rows: int = 3, epsilon: float = 1.0) -> QuerySpec:
    return QuerySpec.model_validate(
        {
            "consumer": "c",
            "receivers": ["c"],
            "dimensions": {"d": {"domain": ["x", "y"]}},
            "metrics": metrics,
            "contribution": {"max_groups_per_unit": groups, "max_rows_per_group": rows},
            "privacy": {"epsilon": epsilon},
        }
    )


def test_sensitivities_follow_the_contribution_bounds() -> None:
    plans = {p.column: p for p in plan_release(_spec({
        "people": {"aggregate": "count_units"},
        "rows": {"aggregate": "count"},
        "spend": {"aggregate": "sum", "column": "v", "bounds": [-50, 20]},
        "mean": {"aggregate": "avg", "column": "v", "bounds": [0, 10]},
    }))}
    assert plans["people"].sensitivity == 2
    assert plans["rows"].sensitivity == 2 * 3
    assert plans["spend__sum"].sensitivity == 2 * 3 * 50
    assert plans["mean__sum"].sensitivity == 2 * 3 * 10 and plans["mean__count"].sensitivity == 6


@pytest.mark.parametrize("epsilon", [0.01, 0.5, 1.0, 3.0])
def test_the_release_never_costs_more_than_the_query_epsilon(epsilon: float) -> None:
    plans = plan_release(_spec({"people": {"aggregate": "count_units"}, "spend": {"aggregate": "sum", "column": "v", "bounds": [0, 100], "epsilon_share": 3}}, epsilon=epsilon))
    cost, delta = release_cost(plans)
    assert delta == 0.0
    assert cost <= epsilon * (1 + 1e-9)
    assert cost >= epsilon * 0.95  # the search does not waste the budget either


def test_noise_is_centred_with_the_stated_accuracy() -> None:
    plan = plan_release(_spec({"people": {"aggregate": "count_units"}}, groups=1))[0]
    draws = [add_noise(plan, [1000, 0])[0] for _ in range(2000)]
    assert abs(statistics.mean(draws) - 1000) < 0.5
    outside = sum(abs(d - 1000) > plan.accuracy for d in draws) / len(draws)
    assert outside <= 0.05 + 0.02  # 4 standard deviations over 2,000 draws
    assert not all(d == 1000 for d in draws)
    assert all(float(d).is_integer() for d in draws), "counts use the discrete Laplace"


def test_a_zero_width_sum_is_refused() -> None:
    with pytest.raises(ValueError, match="carry no information"):
        plan_release(_spec({"s": {"aggregate": "sum", "column": "v", "bounds": [0, 0]}}))


def test_infinite_or_nan_bounds_are_refused_by_the_spec() -> None:
    for bad in ([0, math.inf], [math.nan, 1]):
        with pytest.raises(ValueError):
            _spec({"s": {"aggregate": "sum", "column": "v", "bounds": bad}})
