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


def test_the_mean_interval_is_the_range_of_the_ratio_clamped_to_the_bounds() -> None:
    from dcr_pipelines.lib.privacy.mechanisms import mean_interval

    # sum in [900, 1100], count in [90, 110]: the ratio lies in [900/110, 1100/90]
    low, high = mean_interval(1000, 100, 100, 10, (0, 50))
    assert low == pytest.approx(900 / 110) and high == pytest.approx(1100 / 90)
    assert mean_interval(1000, 100, 100, 10, (0, 10)) == (pytest.approx(900 / 110), 10.0)  # clamped to the bounds
    low, high = mean_interval(-100, 50, 10, 5, (-100, 100))  # a negative sum: the lowest ratio divides by the smallest count
    assert low == pytest.approx(-150 / 5) and high == pytest.approx(-50 / 15)
    assert mean_interval(30, 5, 2, 3, (0, 300)) == (0.0, 300.0)  # the count may be zero: nothing better than the bounds


def _avg_release(totals: list[float], counts: list[float], epsilon: float = 1.0) -> list[dict]:  # type: ignore[type-arg]
    from pathlib import Path

    from dcr_pipelines.lib.policy import ApprovedQuery
    from dcr_pipelines.services.release import _noised_rows

    spec = _spec({"people": {"aggregate": "count_units"}, "mean": {"aggregate": "avg", "column": "v", "bounds": [0, 10]}}, epsilon=epsilon)
    query = ApprovedQuery("q", spec, "", Path("q.yaml"), Path("q.sql"), "", (), ())
    cells = [{"d": d, "people": c, "mean__sum": t, "mean__count": c} for d, t, c in zip(["x", "y"], totals, counts, strict=True)]
    return _noised_rows(cells, query, plan_release(spec), None)


def test_a_released_average_has_an_interval_that_contains_it() -> None:
    rows = [r for r in _avg_release([400_000.0, 150_000.0], [100_000.0, 50_000.0]) if r["metric"] == "mean"]
    assert len(rows) == 2
    for row in rows:
        assert None not in (row["value"], row["ci_low"], row["ci_high"]), row
        assert 0 <= row["ci_low"] <= row["value"] <= row["ci_high"] <= 10, row
        assert row["ci_high"] - row["ci_low"] < 0.1, row  # 100,000 and 50,000 people: far narrower than the bounds
    people = next(r for r in _avg_release([400_000.0, 150_000.0], [100_000.0, 50_000.0]) if r["metric"] == "people")
    assert people["ci_low"] is not None  # the other metrics keep theirs


def test_the_mean_interval_covers_the_true_average_at_least_95_percent_of_the_time() -> None:
    true = {"x": 4.0, "y": 3.0}  # sums 40,000 and 6,000 over counts 10,000 and 2,000, epsilon 0.5: noise is sizeable
    covered = total = 0
    widths = []
    for _ in range(300):
        for row in (r for r in _avg_release([40_000.0, 6_000.0], [10_000.0, 2_000.0], epsilon=0.5) if r["metric"] == "mean"):
            assert row["value"] is not None and row["ci_low"] <= row["value"] <= row["ci_high"]
            covered += row["ci_low"] <= true[row["d"]] <= row["ci_high"]
            total += 1
            widths.append(row["ci_high"] - row["ci_low"])
    assert total == 600 and covered / total >= 0.95, (covered, total)
    assert statistics.mean(widths) < 2, "the interval says much more than the bounds [0, 10]"
