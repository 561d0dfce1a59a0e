"""Difference checks (lib/privacy/difference.py): exact, and the cheap filters never rule out a close pair."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dcr_pipelines.lib.privacy import difference
from dcr_pipelines.lib.privacy.difference import Earlier


def _units(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) - 2**63 for _ in range(n)]  # unit numbers are signed 64-bit hashes


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [([], [], 0), ([1], [], 1), ([], [5, 6], 2), ([1, 2, 3], [1, 2, 3], 0), ([1, 2, 3], [1, 2], 1), ([1, 3], [2, 4], 4),
     ([-(2**63), 2**63 - 1], [2**63 - 1], 1), ([3, 1, 2, 2], [2, 3], 1)],
)
def test_symmetric_difference_counts_people_in_exactly_one_set(a: list[int], b: list[int], expected: int) -> None:
    assert difference.symmetric_difference(difference.people(a), difference.people(b)) == expected


def test_symmetric_difference_equals_python_sets_on_random_sets() -> None:
    rng = random.Random(7)
    for _ in range(300):
        base = _units(rng, rng.randint(0, 400))
        a = set(base) | set(_units(rng, rng.randint(0, 5)))
        b = set(rng.sample(base, rng.randint(0, len(base)))) | set(_units(rng, rng.randint(0, 5)))
        assert difference.symmetric_difference(difference.people(a), difference.people(b)) == len(a ^ b)


def test_the_sample_never_hides_a_close_pair() -> None:
    """Restricting both sets to the sample restricts their difference the same way: sample diff <= full diff."""
    rng = random.Random(11)
    for _ in range(300):
        a = difference.people(_units(rng, rng.randint(0, 2000)))
        drop = rng.randint(0, 30)
        b = difference.people(list(a[drop:]) + _units(rng, rng.randint(0, 5)))
        full = difference.symmetric_difference(a, b)
        assert difference.symmetric_difference(difference.sample(a), difference.sample(b)) <= full


def test_bytes_round_trip() -> None:
    units = difference.people([5, -3, 2**63 - 1, -(2**63)])
    assert np.array_equal(difference.from_bytes(difference.to_bytes(units)), units)
    assert difference.from_bytes(b"").size == 0


@pytest.mark.parametrize(("diff", "threshold", "close"), [(0, 25, False), (1, 25, True), (24, 25, True), (25, 25, False), (1, 1, False), (1, 0, False)])
def test_too_close_means_one_to_threshold_minus_one(diff: int, threshold: int, close: bool) -> None:
    assert difference.too_close(diff, threshold) is close


def _earlier(units: np.ndarray, row: int = 0) -> Earlier:
    return Earlier("ad_hoc", "run-1", row, int(units.size), difference.sample(units))


def test_a_row_one_person_away_from_an_earlier_row_is_withheld_and_identical_or_distant_rows_are_not() -> None:
    rng = random.Random(3)
    earlier_units = difference.people(_units(rng, 200))
    loaded: list[Earlier] = []

    def load(e: Earlier) -> np.ndarray:
        loaded.append(e)
        return earlier_units

    same = earlier_units
    minus_one = earlier_units[1:]
    far = difference.people(_units(rng, 200))
    verdicts = difference.check_rows([same, minus_one, far], 25, [_earlier(earlier_units)], load)
    assert [v.released for v in verdicts] == [True, False, True]
    assert verdicts[1].withheld_because is not None and verdicts[1].withheld_because.source_id == "run-1"


def test_rows_of_the_same_result_are_checked_against_each_other() -> None:
    rng = random.Random(5)
    group = difference.people(_units(rng, 100))
    verdicts = difference.check_rows([group, group[3:], group[40:]], 25, [], lambda e: pytest.fail("nothing earlier to load"))
    assert [v.released for v in verdicts] == [True, False, True]


def test_size_and_sample_rule_out_without_loading_the_full_set() -> None:
    rng = random.Random(9)
    small = difference.people(_units(rng, 50))
    big = difference.people(_units(rng, 5000))
    verdicts = difference.check_rows([small], 25, [_earlier(big)], lambda e: pytest.fail("size alone rules this out"))
    assert verdicts[0].released
