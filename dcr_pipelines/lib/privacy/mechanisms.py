"""Where the noise gets added: opendp measurements built from a query's declared bounds.

The privacy unit is one matched person (``match_id``). The analysis model
keeps at most ``g = max_groups_per_unit`` groups per person and ``k =
max_rows_per_group`` rows per person and group, and clamps each value to
``[L, U]``, so adding or removing one person changes the vector of all
group cells by at most (L1):

- count of persons (count_units): g
- count of rows (count):           g * k
- sum of a clamped column (sum):   g * k * max(|L|, |U|)
- average (avg):                   a sum and a count, each noised

opendp finds the Laplace scale for each metric's share of epsilon and maps
the sensitivity to the epsilon actually spent; counts use the discrete
Laplace on integers, sums the Laplace on floats. Only opendp draws noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import opendp.prelude as dp

from ..policy.models import MetricKind, QuerySpec

dp.enable_features("contrib")

ALPHA = 0.05  # 95% intervals


@dataclass(frozen=True)
class NoisePlan:
    """One noised vector: which pre-noise column, its sensitivity and its opendp scale."""

    metric: str
    column: str
    integer: bool
    sensitivity: float
    epsilon_target: float
    scale: float
    epsilon: float  # what opendp maps the sensitivity to (<= target)
    accuracy: float  # half-width of the 95% interval

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise ValueError("sensitivity must be positive and finite")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError("epsilon must be positive and finite")


def _space(integer: bool) -> tuple[object, object]:
    if integer:
        return dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int)
    return dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)


def _measurement(integer: bool, scale: float) -> dp.Measurement:
    domain, metric = _space(integer)
    return dp.m.make_laplace(domain, metric, scale=scale)


def _plan_one(metric: str, column: str, integer: bool, sensitivity: float, epsilon: float) -> NoisePlan:
    d_in: int | float = int(sensitivity) if integer else float(sensitivity)
    scale = dp.binary_search_param(lambda s: _measurement(integer, s), d_in=d_in, d_out=epsilon)
    spent = _measurement(integer, scale).map(d_in)
    accuracy = (
        dp.discrete_laplacian_scale_to_accuracy(scale, ALPHA) if integer else dp.laplacian_scale_to_accuracy(scale, ALPHA)
    )
    return NoisePlan(metric, column, integer, float(sensitivity), epsilon, scale, spent, accuracy)


def plan_release(spec: QuerySpec) -> list[NoisePlan]:
    """The noise of every metric of ``spec``; their epsilons add up to at most the query's epsilon."""
    if spec.privacy is None:
        raise ValueError("a DP release needs the query's privacy settings")
    g = spec.contribution.max_groups_per_unit
    k = spec.contribution.max_rows_per_group
    total_share = sum(m.epsilon_share for m in spec.metrics.values())
    plans: list[NoisePlan] = []
    for name, metric in spec.metrics.items():
        epsilon = spec.privacy.epsilon * metric.epsilon_share / total_share
        if metric.aggregate == MetricKind.COUNT_UNITS:
            plans.append(_plan_one(name, name, True, g, epsilon))
        elif metric.aggregate == MetricKind.COUNT:
            plans.append(_plan_one(name, name, True, g * k, epsilon))
        else:
            assert metric.bounds is not None
            bound = max(abs(metric.bounds[0]), abs(metric.bounds[1]))
            if bound == 0:
                raise ValueError(f"metric {name}: bounds [0, 0] carry no information")
            sum_share = epsilon / 2 if metric.aggregate == MetricKind.AVG else epsilon
            plans.append(_plan_one(name, f"{name}__sum", False, g * k * bound, sum_share))
            if metric.aggregate == MetricKind.AVG:
                plans.append(_plan_one(name, f"{name}__count", True, g * k, epsilon / 2))
    return plans


def release_cost(plans: Sequence[NoisePlan]) -> float:
    """Epsilon of releasing every planned vector once (sequential composition)."""
    return sum(p.epsilon for p in plans)


def add_noise(plan: NoisePlan, values: Sequence[float]) -> list[float]:
    """Release ``values`` (one per group cell) through the plan's opendp measurement."""
    measurement = _measurement(plan.integer, plan.scale)
    if plan.integer:
        return [float(v) for v in measurement([int(round(v)) for v in values])]
    return [float(v) for v in measurement([float(v) for v in values])]


Kind = Literal["count", "sum"]
