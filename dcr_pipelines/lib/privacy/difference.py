"""Difference checks: no released row may differ from an earlier one by a few people.

Two exact aggregates over people sets that differ by one person tell that
person's contribution (``count(*) where ...`` minus the same query without one
person's rows). Google's Ads Data Hub answers this with *difference checks*:
every released row keeps the set of people behind it, all query runners of a
collaboration are one adversary, and a new row whose set differs from any
earlier row's set by at least one and fewer than the threshold is withheld.

Sets are sorted, unique ``int64`` arrays of unit numbers (a stable number
per matched person, see ``matching``). The symmetric difference is counted
exactly; two filters that can only rule candidates *out* keep it cheap:

- size: ``|A △ B| >= abs(|A| - |B|)``, so only rows whose size is within the
  threshold are candidates (a range scan on an index);
- sample: the units are uniformly spread hashes, and restricting both sets to
  the units ``u`` with ``u % SAMPLE_MODULUS == 0`` restricts their symmetric
  difference the same way, so a sample difference of at least the threshold
  proves the full one is too.

Nothing here is approximate: a row is withheld exactly when some earlier
row's set differs from its own by 1 to ``threshold - 1`` people.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_MODULUS = 16

People = npt.NDArray[np.int64]


def people(units: Iterable[int] | People) -> People:
    """A person set as a sorted array of unique unit numbers."""
    array = np.asarray(list(units) if not isinstance(units, np.ndarray) else units, dtype=np.int64)
    return np.unique(array)


def sample(units: People) -> People:
    """The units that fall in the fixed 1/SAMPLE_MODULUS sample (same rule for every set)."""
    return units[(units % SAMPLE_MODULUS) == 0]


def to_bytes(units: People) -> bytes:
    return np.ascontiguousarray(units, dtype="<i8").tobytes()


def from_bytes(data: bytes) -> People:
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


def symmetric_difference(a: People, b: People) -> int:
    """``|a △ b|`` for sorted unique arrays, in O(|a| log |b|)."""
    if a.size == 0 or b.size == 0:
        return int(a.size + b.size)
    positions = np.searchsorted(b, a)
    positions[positions == b.size] = b.size - 1
    common = int(np.count_nonzero(b[positions] == a))
    return int(a.size + b.size - 2 * common)


def too_close(difference: int, threshold: int) -> bool:
    """Whether two sets this far apart may not both be released: 1 <= difference < threshold."""
    return 0 < difference < threshold


@dataclass(frozen=True)
class Earlier:
    """A released row, as the check sees it: where it came from, its size, its sample and (lazily) its set."""

    source: str
    source_id: str
    row_no: int
    size: int
    sample: People


@dataclass(frozen=True)
class Verdict:
    """A new row's fate: released, or withheld because of the named earlier row."""

    row: int
    withheld_because: Earlier | None

    @property
    def released(self) -> bool:
        return self.withheld_because is None


def check_rows(
    rows: Sequence[People],
    threshold: int,
    earlier: Sequence[Earlier],
    load: Callable[[Earlier], People],
    *,
    source: str = "",
    source_id: str = "",
) -> list[Verdict]:
    """Decide each new row against every earlier row and every new row released before it.

    ``earlier`` may hold any superset of the rows within ``threshold`` of each
    new row's size; ``load`` fetches an earlier row's full set when its size
    and sample cannot rule it out.
    """
    verdicts: list[Verdict] = []
    accepted: list[tuple[Earlier, People]] = []
    cache: dict[tuple[str, str, int], People] = {}
    for i, units in enumerate(rows):
        own_sample = sample(units)
        reason: Earlier | None = None
        candidates: list[tuple[Earlier, People | None]] = [(e, None) for e in earlier] + [(e, s) for e, s in accepted]
        for other, known in candidates:
            if abs(other.size - units.size) >= threshold:
                continue
            if symmetric_difference(own_sample, other.sample) >= threshold:
                continue
            key = (other.source, other.source_id, other.row_no)
            full = known if known is not None else cache.get(key)
            if full is None:
                full = cache[key] = load(other)
            if too_close(symmetric_difference(units, full), threshold):
                reason = other
                break
        verdicts.append(Verdict(i, reason))
        if reason is None:
            accepted.append((Earlier(source, source_id, i, int(units.size), own_sample), units))
    return verdicts

