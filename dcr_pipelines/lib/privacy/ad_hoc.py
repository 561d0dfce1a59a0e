"""Where ad-hoc SQL gets its noise: the differential_privacy rule, from bounded group sums to released groups.

Phase 1 (``lib/ad_hoc/checker.py``) hands over, per group, the sum over people
of each person's *bounded* contribution: a person counts in at most ``G =
max_groups`` groups, adds at most ``K = max_rows`` rows to a row count, 1 to a
count of people, and a value clamped to ``[L, U]`` to a sum (the person's own
sum) or an average (the person's own average). So adding or removing one
person, with all of their rows on every side, changes each vector of group
cells by at most (L1):

- count of rows:   G * K
- count of people: G
- sum:             G * max(|L|, |U|)
- average:         a sum (G * max(|L|, |U|)) and a count of people (G), half the aggregate's epsilon each

Every aggregate gets an equal share of the query's epsilon. Group keys are
either every combination of public domains (empty groups too), or the groups
whose noised count of people clears opendp's Laplace threshold (key
selection, costing ``delta``): then that count takes a share too, and is the
released value of COUNT(DISTINCT person) when the query asks for it. Groups
whose noised count of people is under ``min_people`` are dropped (post-processing).
Only opendp draws noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .contribution import DpQuery
from .mechanisms import (
    ALPHA,
    KeySelectionPlan,
    NoisePlan,
    add_noise,
    dp_accuracy_of_threshold,
    half_width,
    mean_interval,
    plan_threshold,
    plan_vector,
)

PEOPLE_COLUMN = "dcr_units"  # the count of people per group that phase 1 always returns (checker.UNITS)


@dataclass(frozen=True)
class AdHocNoise:
    """The noise of one DP ad-hoc query: a plan per noised column, the key selection (if any) and the cost."""

    plans: tuple[NoisePlan, ...]
    selection: KeySelectionPlan | None
    people: str | None  # the column whose noised value is each group's count of people (for key selection or min_people)
    epsilon: float
    delta: float


def plan(query: DpQuery) -> AdHocNoise:
    """The opendp plans of ``query``; their epsilons add up to at most ``query.epsilon`` (sequential composition)."""
    g = query.max_groups
    people_column = next((f"a{j}" for j, a in enumerate(query.aggregates, start=1) if a.function == "count_people"), None)
    needs_people = query.key_selection or query.min_people > 0
    internal = needs_people and people_column is None
    shares = len(query.aggregates) + (1 if internal else 0)
    share = query.epsilon / shares
    selection = None
    if query.key_selection:
        selection = plan_threshold(people_column or PEOPLE_COLUMN, share, query.key_selection_delta, g, at_least=max(1, query.min_people))
    plans: list[NoisePlan] = []
    if internal and selection is None:
        plans.append(plan_vector(PEOPLE_COLUMN, True, g, share))
    for j, aggregate in enumerate(query.aggregates, start=1):
        column = f"a{j}"
        bound = max(abs(aggregate.lower), abs(aggregate.upper))
        if aggregate.function == "count_people":
            if selection is None:
                plans.append(plan_vector(column, True, g, share))
        elif aggregate.function == "count_rows":
            plans.append(plan_vector(column, True, g * int(aggregate.upper), share))
        elif aggregate.function == "sum":
            plans.append(plan_vector(column, False, g * max(bound, 1e-9), share))
        else:
            plans.append(plan_vector(f"{column}__sum", False, g * max(bound, 1e-9), share / 2))
            plans.append(plan_vector(f"{column}__n", True, g, share / 2))
    epsilon = sum(p.epsilon for p in plans) + (selection.epsilon if selection else 0.0)
    return AdHocNoise(tuple(plans), selection, people_column or (PEOPLE_COLUMN if needs_people else None), epsilon,
                      selection.delta if selection else 0.0)


@dataclass(frozen=True)
class NoisedGroup:
    """One released group: its keys, each aggregate's noised value and 95% interval (None where undefined)."""

    keys: tuple[Any, ...]
    values: tuple[float | int | None, ...]
    intervals: tuple[tuple[float, float] | None, ...] = field(default=())


def _key(keys: Sequence[Any]) -> str:
    return json.dumps([None if k is None else str(k) for k in keys])


def release(noise: AdHocNoise, query: DpQuery, names: Sequence[str], groups: Sequence[Sequence[Any]], keys: int) -> list[NoisedGroup]:
    """Noise phase 1's ``groups`` (rows with ``names``: k1.., dcr_units, aggregate columns) and keep the released ones.

    With public domains every combination is released (absent groups count zero); with key selection only the
    groups whose noised count of people clears the threshold. Counts are whole numbers, their intervals widened to
    the whole numbers around them; an average is the noised sum over the noised count, clamped to its bounds.
    """
    index = {n: i for i, n in enumerate(names)}
    cells: dict[str, tuple[tuple[Any, ...], dict[str, float]]] = {}
    for row in groups:
        key = tuple(row[:keys])
        cells[_key(key)] = (key, {n: float(row[i] or 0) for n, i in index.items() if i >= keys})
    if query.domains is not None:
        import itertools

        cells = {_key(k): (k, cells.get(_key(k), (k, {}))[1]) for k in itertools.product(*query.domains)}
    order = list(cells)
    selected: dict[str, float] = {}
    if noise.selection is not None:
        counts = {k: int(cells[k][1].get(PEOPLE_COLUMN, 0)) for k in order}
        selected = {k: float(v) for k, v in noise.selection.measurement()(counts).items()}
        order = [k for k in order if k in selected]
    noised: dict[str, list[float]] = {p.column: add_noise(p, [cells[k][1].get(p.column if p.column != PEOPLE_COLUMN else PEOPLE_COLUMN, 0.0) for k in order])
                                      for p in noise.plans}
    if noise.selection is not None:
        noised[noise.selection.metric] = [selected[k] for k in order]
    by_column = {p.column: p for p in noise.plans}
    out: list[NoisedGroup] = []
    for i, k in enumerate(order):
        if noise.people is not None and query.min_people and noised[noise.people][i] < query.min_people:
            continue  # post-processing of a released count: groups with too few people (noised) are dropped
        values: list[float | int | None] = []
        intervals: list[tuple[float, float] | None] = []
        for j, aggregate in enumerate(query.aggregates, start=1):
            column = f"a{j}"
            if aggregate.function == "avg":
                total, count = noised[f"{column}__sum"][i], noised[f"{column}__n"][i]
                halves = (half_width(by_column[f"{column}__sum"], ALPHA / 2), half_width(by_column[f"{column}__n"], ALPHA / 2))
                if count >= 1:
                    values.append(min(max(total / count, aggregate.lower), aggregate.upper))
                    intervals.append(mean_interval(total, halves[0], count, halves[1], (aggregate.lower, aggregate.upper)))
                else:
                    values.append(None)
                    intervals.append(None)
                continue
            value = noised[column][i]
            if noise.selection is not None and column == noise.selection.metric:
                half = dp_accuracy_of_threshold(noise.selection)
            else:
                half = by_column[column].accuracy
            if aggregate.function in ("count_rows", "count_people"):
                values.append(int(round(value)))
                intervals.append((math.floor(value - half), math.ceil(value + half)))
            else:
                values.append(value)
                intervals.append((value - half, value + half))
        out.append(NoisedGroup(cells[k][0], tuple(values), tuple(intervals)))
    return out


def noise_columns(query: DpQuery) -> list[str]:
    """Every phase-1 column the noise reads besides the keys: the count of people and each aggregate's columns."""
    return [PEOPLE_COLUMN, *(f"a{j}{suffix}" for j, a in enumerate(query.aggregates, start=1) for suffix in a.columns)]
