"""Where the noise gets added: opendp measurements built from a query's declared bounds.

The privacy unit is one matched person (``match_id``). The analysis model
keeps at most ``g = max_groups_per_unit`` groups per person and ``k =
max_rows_per_group`` rows per person and group, and clamps each value to
``[L, U]``, so adding or removing one person changes the vector of all
group cells by at most (L1):

- count of persons (count_units): g
- count of rows (count):           g * k
- sum of a clamped column (sum):   g * k * max(|L|, |U|)
- average (avg):                   a sum and a count, each noised (half the metric's epsilon each);
                                   released as their ratio, clamped to the bounds, with the interval
                                   of :func:`mean_interval`

opendp finds the Laplace scale for each metric's share of epsilon and maps
the sensitivity to the epsilon actually spent; counts use the discrete
Laplace on integers, sums the Laplace on floats. Only opendp draws noise.

Group keys come from the public domains the query declares. A dimension
without a domain instead declares ``key_selection_delta``: the distinct-person
count per group is then released with opendp's Laplace-threshold mechanism
(keys whose noisy count falls below a threshold are dropped), which costs
(epsilon, delta); the other metrics are noised for the surviving keys only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def _space(integer: bool) -> tuple[dp.Domain, dp.Metric]:
    if integer:
        return dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int)
    return dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)


def _measurement(integer: bool, scale: float) -> dp.Measurement:
    domain, metric = _space(integer)
    return dp.m.make_laplace(domain, metric, scale=scale)


@functools.lru_cache(maxsize=4096)  # pure: opendp's binary search gives the same scale for the same inputs (tens of ms each)
def _plan_one(metric: str, column: str, integer: bool, sensitivity: float, epsilon: float) -> NoisePlan:
    d_in: int | float = int(sensitivity) if integer else float(sensitivity)
    scale = dp.binary_search_param(lambda s: _measurement(integer, s), d_in=d_in, d_out=epsilon)
    spent = _measurement(integer, scale).map(d_in)
    accuracy = (
        dp.discrete_laplacian_scale_to_accuracy(scale, ALPHA) if integer else dp.laplacian_scale_to_accuracy(scale, ALPHA)
    )
    return NoisePlan(metric, column, integer, float(sensitivity), epsilon, scale, spent, accuracy)


def plan_count(metric: str, epsilon: float, sensitivity: int = 1) -> NoisePlan:
    """One integer count, discrete Laplace noise (e.g. the overlap size: one person changes it by at most one)."""
    return _plan_one(metric, metric, True, sensitivity, epsilon)


@dataclass(frozen=True)
class KeySelectionPlan:
    """Laplace-threshold release of a distinct-person count per group, for groups without a public domain."""

    metric: str
    scale: float
    threshold: int
    max_groups: int  # l0 sensitivity: groups one person may touch
    epsilon: float
    delta: float

    def measurement(self) -> dp.Measurement:
        return _threshold_measurement(self.scale, self.threshold)

    def d_in(self) -> tuple[int, int, int]:
        return (self.max_groups, self.max_groups, 1)


def _threshold_measurement(scale: float, threshold: int) -> dp.Measurement:
    domain = dp.map_domain(dp.atom_domain(T=str), dp.atom_domain(T=int))
    metric = dp.l01inf_distance(dp.absolute_distance(T=int))
    return dp.m.make_laplace_threshold(domain, metric, scale=scale, threshold=threshold)


def needs_key_selection(spec: QuerySpec) -> bool:
    return any(d.domain is None for d in spec.dimensions.values())


def plan_key_selection(spec: QuerySpec) -> KeySelectionPlan | None:
    """The threshold mechanism for a query with a dimension lacking a public domain, or None."""
    if not needs_key_selection(spec):
        return None
    assert spec.privacy is not None
    counts = [name for name, m in spec.metrics.items() if m.aggregate == MetricKind.COUNT_UNITS]
    if not counts:
        raise ValueError("DP key selection needs a count_units metric to threshold on")
    delta = min(d.key_selection_delta for d in spec.dimensions.values() if d.key_selection_delta is not None)
    metric = spec.metrics[counts[0]]
    total_share = sum(m.epsilon_share for m in spec.metrics.values())
    epsilon = spec.privacy.epsilon * metric.epsilon_share / total_share
    return plan_threshold(counts[0], epsilon, delta, spec.contribution.max_groups_per_unit)


@functools.lru_cache(maxsize=1024)
def plan_threshold(metric: str, epsilon: float, delta: float, max_groups: int, at_least: int = 1) -> KeySelectionPlan:
    """opendp's Laplace-threshold release of a person count per group, for a person in at most ``max_groups`` groups.

    The threshold drives delta only, so: the smallest scale whose epsilon fits, then the smallest threshold (not
    below ``at_least``) whose delta fits at that scale; both maps are computed by opendp.
    """
    d_in = (max_groups, max_groups, 1)
    scale = dp.binary_search(lambda s: _threshold_measurement(s, (1 << 31) - 1).map(d_in)[0] <= epsilon, bounds=(1e-6, 1e9), T=float)
    threshold = int(dp.binary_search(lambda t: _threshold_measurement(scale, int(t)).check(d_in, (epsilon, delta)), bounds=(1, (1 << 31) - 1), T=int))
    threshold = max(threshold, at_least)
    spent_eps, spent_delta = _threshold_measurement(scale, threshold).map(d_in)
    return KeySelectionPlan(metric, scale, threshold, max_groups, spent_eps, spent_delta)


def plan_vector(column: str, integer: bool, sensitivity: float, epsilon: float) -> NoisePlan:
    """Laplace noise (discrete on integers) for one vector of group cells whose L1 sensitivity is ``sensitivity``."""
    return _plan_one(column, column, integer, sensitivity, epsilon)


def plan_release(spec: QuerySpec) -> list[NoisePlan]:
    """The noise of every metric of ``spec``; their epsilons add up to at most the query's epsilon.

    With key selection, the count it thresholds on is planned by
    ``plan_key_selection`` instead and is left out here.
    """
    if spec.privacy is None:
        raise ValueError("a DP release needs the query's privacy settings")
    g = spec.contribution.max_groups_per_unit
    k = spec.contribution.max_rows_per_group
    total_share = sum(m.epsilon_share for m in spec.metrics.values())
    selection = plan_key_selection(spec)
    plans: list[NoisePlan] = []
    for name, metric in spec.metrics.items():
        epsilon = spec.privacy.epsilon * metric.epsilon_share / total_share
        if selection is not None and name == selection.metric:
            continue
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


def half_width(plan: NoisePlan, alpha: float = ALPHA) -> float:
    """Half-width of the ``1 - alpha`` interval of one value noised by ``plan`` (opendp's accuracy of its scale)."""
    if plan.integer:
        return float(dp.discrete_laplacian_scale_to_accuracy(plan.scale, alpha))
    return float(dp.laplacian_scale_to_accuracy(plan.scale, alpha))


def mean_interval(total: float, total_half: float, count: float, count_half: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """A 95% interval of an average released as noisy sum / noisy count, from the two parts' intervals.

    Post-processing of values already released, no new access to the data. ``total_half`` and ``count_half`` are
    the half-widths of *97.5%* intervals of the noisy sum and the noisy count (:func:`half_width` with ``ALPHA / 2``):
    both contain the true values at once with probability at least 95% (union bound). The true average
    ``S / C`` of a sum ``S`` in ``[s_low, s_high]`` over a count ``C`` in ``[c_low, c_high]`` with ``c_low > 0`` lies
    between ``min(s_low / c_low, s_low / c_high)`` and ``max(s_high / c_low, s_high / c_high)`` (for non-negative
    sums: ``[s_low / c_high, s_high / c_low]``); that range is clamped to the metric's bounds, which hold every
    clamped value and so their average. When ``c_low <= 0`` the count may be zero and the interval is the bounds.
    The interval always contains the released value ``total / count`` clamped to the bounds.
    """
    low_bound, high_bound = float(bounds[0]), float(bounds[1])
    c_low, c_high = count - count_half, count + count_half
    if c_low <= 0:
        return low_bound, high_bound
    s_low, s_high = total - total_half, total + total_half
    low = min(s_low / c_low, s_low / c_high)
    high = max(s_high / c_low, s_high / c_high)
    return min(max(low, low_bound), high_bound), max(min(high, high_bound), low_bound)


def release_cost(plans: Sequence[NoisePlan], selection: KeySelectionPlan | None = None) -> tuple[float, float]:
    """(epsilon, delta) of releasing every planned vector once (sequential composition)."""
    epsilon = sum(p.epsilon for p in plans) + (selection.epsilon if selection else 0.0)
    return epsilon, (selection.delta if selection else 0.0)


def dp_accuracy_of_threshold(selection: KeySelectionPlan) -> float:
    """Half-width of the 95% interval of a count released by the threshold mechanism (Laplace noise)."""
    return float(dp.laplacian_scale_to_accuracy(selection.scale, ALPHA))


def select_keys(selection: KeySelectionPlan, counts: dict[str, int]) -> dict[str, float]:
    """The groups (joined keys) whose noisy distinct-person count clears the threshold, with that count."""
    return {k: float(v) for k, v in selection.measurement()(counts).items()}


def add_noise(plan: NoisePlan, values: Sequence[float]) -> list[float]:
    """Release ``values`` (one per group cell) through the plan's opendp measurement."""
    measurement = _measurement(plan.integer, plan.scale)
    if plan.integer:
        return [float(v) for v in measurement([int(round(v)) for v in values])]
    return [float(v) for v in measurement([float(v) for v in values])]

