"""The key epoch's streamed comparison: one pass over sorted streams gives exactly the set differences."""

from __future__ import annotations

import random

import pytest

from dcr_pipelines.lib import psi_epoch


def test_diff_of_random_sorted_streams_is_the_set_difference_per_peer() -> None:
    rng = random.Random(8)
    universe = [f"{rng.getrandbits(64):016x}" for _ in range(300)]
    for _trial in range(200):
        owned = sorted(rng.sample(universe, rng.randint(0, 60)))
        kept = {p: sorted(rng.sample(universe, rng.randint(0, 60))) for p in rng.sample(["a", "b", "c"], rng.randint(1, 3))}
        items = list(psi_epoch.diff(((t, f"id-{t}") for t in owned), kept))
        new = [i for i in items if isinstance(i, psi_epoch.New)]
        gone = {(i.peer, i.token) for i in items if isinstance(i, psi_epoch.Gone)}
        assert {(n.token, p) for n in new for p in n.peers} == {(t, p) for p in kept for t in owned if t not in kept[p]}
        assert all(n.identifier == f"id-{n.token}" and n.peers for n in new)
        assert len(new) == len({n.token for n in new})  # one entry per identity, listing every peer it lacks
        assert gone == {(p, t) for p, tokens in kept.items() for t in tokens if t not in owned}


def test_diff_refuses_streams_out_of_order() -> None:
    """A collation that sorts otherwise than byte-wise would silently re-blind or drop identities: it stops instead."""
    with pytest.raises(ValueError, match="ascending token order"):
        list(psi_epoch.diff([("b", "x"), ("a", "y")], {"p": []}))
    with pytest.raises(ValueError, match="kept tokens not in ascending order"):
        list(psi_epoch.diff([("z", "x")], {"p": ["b", "a"]}))
