"""Matching inside a key epoch: after any sequence of edits, the same people as a fresh match, for only the changed identities' work."""

from __future__ import annotations

import hashlib
import random

from dcr_pipelines.lib import psi_epoch
from dcr_pipelines.lib.matching import PartyInput


def _party(name: str, identifiers: set[str]) -> PartyInput:
    distinct = sorted(identifiers)
    return PartyInput(name, [hashlib.sha256(f"{name}:{i}".encode()).hexdigest() for i in distinct], distinct)


def _pairs(result, inputs: list[PartyInput]) -> set[tuple[str, ...]]:  # type: ignore[no-untyped-def]
    """The matched people as tuples of identifiers, each row checked to link one person's tokens."""
    by_token = {t: i for inp in inputs for t, i in zip(inp.tokens, inp.identifiers, strict=False)}
    out = set()
    for row in result.rows:
        people = {by_token[t] for t in row[1:]}
        assert len(people) == 1, "a row links tokens of different people"
        out.add(next(iter(people)))
    return out


def _plain(inputs: list[PartyInput]) -> set[str]:
    sets = [set(inp.identifiers) for inp in inputs]
    return set.intersection(*sets)


def test_random_edit_sequences_match_like_a_fresh_match_and_blind_only_what_changed() -> None:
    rng = random.Random(20)
    universe = [f"p{i}@example.com" for i in range(400)]
    for _trial in range(4):
        sets = {p: set(rng.sample(universe, 120)) for p in ("client", "s1", "s2")}
        state: psi_epoch.EpochState | None = None
        for _step in range(6):
            inputs = [_party(p, ids) for p, ids in sets.items()]
            fresh = state is None
            if state is None:
                state = psi_epoch.new_state(inputs, "client")
            before = {p: set(sets[p]) for p in sets}
            result, change = psi_epoch.match_in_epoch(inputs, "client", state, workers=1)
            assert _pairs(result, inputs) == _plain(inputs)
            assert result.matched == len(_plain(inputs))
            if fresh:
                assert change.blinded == sum(len(s) for s in sets.values())
            # an edit: a few identities added and removed per party (sometimes none)
            for p in sets:
                drop = set(rng.sample(sorted(sets[p]), rng.randint(0, 5)))
                add = set(rng.sample(universe, rng.randint(0, 8))) - sets[p]
                sets[p] = (sets[p] - drop) | add
            next_inputs = [_party(p, ids) for p, ids in sets.items()]
            _, probe = psi_epoch.match_in_epoch(next_inputs, "client", _copy(state), workers=1)
            assert probe.blinded == sum(len(sets[p] - before[p]) for p in sets), "only new identities are blinded"
            assert {t for _, t in probe.removed} == {t for inp in inputs for t, i in zip(inp.tokens, inp.identifiers, strict=False)
                                                     if i not in sets[inp.party]}


def _copy(state: psi_epoch.EpochState) -> psi_epoch.EpochState:
    return psi_epoch.EpochState(state.config, dict(state.keys), {k: dict(v) for k, v in state.doubles.items()})


def test_values_differ_across_epochs_and_parties() -> None:
    """A blinded value means nothing outside its epoch: new keys give other values for the same person."""
    inputs = [_party("client", {"a@x.org", "b@x.org"}), _party("s1", {"a@x.org"})]
    one, two = psi_epoch.new_state(inputs, "client"), psi_epoch.new_state(inputs, "client")
    psi_epoch.match_in_epoch(inputs, "client", one, workers=1)
    psi_epoch.match_in_epoch(inputs, "client", two, workers=1)
    assert set(one.doubles[("client", "s1")].values()).isdisjoint(two.doubles[("client", "s1")].values())
    # within one epoch, the client's and the server's values for the shared person are equal (that is the match)
    token_c = inputs[0].tokens[inputs[0].identifiers.index("a@x.org")]
    assert one.doubles[("client", "s1")][token_c] == one.doubles[("s1", "client")][inputs[1].tokens[0]]


def test_a_large_change_uses_worker_processes_and_gives_the_same_people() -> None:
    rng = random.Random(3)
    universe = [f"q{i}@example.com" for i in range(6000)]
    inputs = [_party("client", set(rng.sample(universe, 2500))), _party("s1", set(rng.sample(universe, 2500)))]
    result, change = psi_epoch.match_in_epoch(inputs, "client", psi_epoch.new_state(inputs, "client"), workers=2)
    assert change.blinded == 5000 and change.multiplications == 10000
    assert _pairs(result, inputs) == _plain(inputs)


def test_padding_adds_one_row_per_unmatched_identity() -> None:
    inputs = [_party("client", {"a@x.org", "b@x.org", "c@x.org"}), _party("s1", {"a@x.org", "d@x.org"})]
    result, _ = psi_epoch.match_in_epoch(inputs, "client", psi_epoch.new_state(inputs, "client"), padding=True, workers=1)
    assert result.matched == 1
    assert len(result.rows) == 1 + 2 + 1  # the shared person, the client's two others, the server's one other
    real = {t for inp in inputs for t in inp.tokens}
    assert all(sum(t in real for t in row[1:]) in (1, 2) for row in result.rows)
