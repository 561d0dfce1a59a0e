"""What one person can add to a differentially private ad-hoc answer: the plan the checker hands to the noise.

Pure value objects (no opendp import): ``lib/ad_hoc/checker.py`` builds them from the
policy and the query, ``lib/privacy/ad_hoc.py`` turns them into opendp measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DpAggregate:
    """One noised aggregate of a DP ad-hoc query: what one person adds to one group lies in [lower, upper].

    ``count_rows``: the person's rows (COUNT(*) or non-null COUNT(x)), at most ``max_rows_per_group``;
    ``count_people``: 1 (COUNT(DISTINCT join column)); ``sum``: the person's sum, clamped; ``avg``: the person's
    average, clamped, released as a noised sum over a noised count of people.
    """

    function: str
    label: str
    lower: float
    upper: float

    def __post_init__(self) -> None:
        if self.function not in ("count_rows", "count_people", "sum", "avg"):
            raise ValueError(f"not a DP aggregate: {self.function}")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)) or self.lower > self.upper:
            raise ValueError("contribution bounds must be finite with lower <= upper")

    @property
    def columns(self) -> tuple[str, ...]:
        """Its phase-1 columns, relative to its index j: ``a{j}`` or, for an average, ``a{j}__sum`` and ``a{j}__n``."""
        return ("__sum", "__n") if self.function == "avg" else ("",)


@dataclass(frozen=True)
class DpQuery:
    """How a DP ad-hoc query is noised: its cost, contribution limits, aggregates and where its group keys come from.

    ``domains`` holds every key's public domain when all keys have one (all combinations are released, empty ones
    too); otherwise None and groups are released by DP key selection (opendp's Laplace threshold, with ``delta``).
    ``min_people``: groups whose noised count of people falls below it are dropped (post-processing), from the
    threshold of an exact-rule dataset read in the same query.
    """

    epsilon: float
    key_selection_delta: float
    max_groups: int
    max_rows: int
    aggregates: tuple[DpAggregate, ...]
    domains: tuple[tuple[str, ...], ...] | None
    min_people: int = 0

    @property
    def key_selection(self) -> bool:
        return self.domains is None

    @property
    def cells(self) -> int:
        return math.prod(len(d) for d in self.domains) if self.domains is not None else 0
