"""Matching inside a key epoch: keys and blinded sets kept, so a new match does elliptic-curve work only for changed identities.

The commutative cipher behind our PSI: ``blind(k, x) = H(x)^k`` and
``reblind(j, blind(k, x)) == blind(k*j, x)``. Within an epoch every party
keeps one key. For the client C and each other party S the state holds
``H(x)^(kC*kS)`` for every identity x of C and of S (C's items reblinded by
S, S's items reblinded by C). Equal values are the same identity, so the
intersection and the pairing of tokens are a lookup; a new run blinds and
reblinds only the identities added since the last one (two scalar
multiplications each) and drops the removed ones.

Each blinding runs in worker processes given only that party's key and
that party's items; the halves exchange blinded values only. The state lives
in the operator's matching schema, which no member role can read, and is
deleted when the epoch ends (its keys with it). With ``key_epoch: run`` none
of this is used: every match draws fresh keys, as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .matching import MatchResult, PartyInput, assemble
from .processes import map_chunks, worker_pool
from .psi import blind, new_key, reblind


@dataclass
class EpochState:
    """One epoch: each party's key, and per (owner, peer) the doubly blinded value of each of the owner's tokens."""

    config: str
    keys: dict[str, bytes]
    doubles: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochChange:
    """What one match changed in the state: new (owner, peer, token, value) rows and removed (owner, token) pairs."""

    added: list[tuple[str, str, str, bytes]]
    removed: set[tuple[str, str]]
    blinded: int  # identities blinded this run
    multiplications: int  # scalar multiplications this run (a blinding, and a reblinding per peer)


def config_of(inputs: Sequence[PartyInput], client: str) -> str:
    """What an epoch is bound to: the client and the set of parties (another set starts a new epoch)."""
    return hashlib.sha256(f"client={client};parties={','.join(sorted(i.party for i in inputs))};v1".encode()).hexdigest()


def new_state(inputs: Sequence[PartyInput], client: str) -> EpochState:
    return EpochState(config_of(inputs, client), {inp.party: new_key() for inp in inputs})


def match_in_epoch(inputs: Sequence[PartyInput], client: str, state: EpochState, *, padding: bool = False,
                   workers: int | None = None) -> tuple[MatchResult, EpochChange]:
    """The cross-reference of ``inputs`` using (and updating, in memory) ``state``; the change to persist."""
    by_party = {inp.party: inp for inp in inputs}
    servers = [inp for inp in inputs if inp.party != client]
    pairs = [(client, s.party) for s in servers] + [(s.party, client) for s in servers]  # (owner, peer)
    added: list[tuple[str, str, str, bytes]] = []
    removed: set[tuple[str, str]] = set()
    new_items: dict[tuple[str, str], list[str]] = {}
    for owner, peer in pairs:
        have = state.doubles.setdefault((owner, peer), {})
        current = set(by_party[owner].tokens)
        for t in [t for t in have if t not in current]:
            del have[t]
            removed.add((owner, t))
        new_items[(owner, peer)] = [t for t in by_party[owner].tokens if t not in have]
    # Each party blinds its new identities once (the client's serve every server), then the peer reblinds them.
    wanted: dict[str, set[str]] = {}
    for (owner, _), tokens in new_items.items():
        wanted.setdefault(owner, set()).update(tokens)
    to_blind = {p: sorted(tokens) for p, tokens in wanted.items()}
    identifier_of = {p: dict(zip(by_party[p].tokens, by_party[p].identifiers, strict=False)) for p in to_blind}
    blinded_count = sum(len(v) for v in to_blind.values())
    parts = workers or os.cpu_count() or 1
    small = blinded_count < 2000  # a worker pool costs more than a few thousand multiplications
    pool = None if small else worker_pool(parts)
    try:
        singles = {p: dict(zip(tokens, map_chunks(pool, blind, state.keys[p], [identifier_of[p][t] for t in tokens], parts), strict=True))
                   for p, tokens in to_blind.items()}
        for owner, peer in pairs:
            tokens = new_items[(owner, peer)]
            doubles = map_chunks(pool, reblind, state.keys[peer], [singles[owner][t] for t in tokens], parts)
            have = state.doubles[(owner, peer)]
            for token, value in zip(tokens, doubles, strict=True):
                have[token] = value
                added.append((owner, peer, token, value))
    finally:
        if pool is not None:
            pool.shutdown()
    matched: list[tuple[str, ...]] = []  # (client token, each server's token) per shared person
    lookups = [{v: t for t, v in state.doubles[(s.party, client)].items()} for s in servers]
    for token in by_party[client].tokens:
        others = [lookup.get(state.doubles[(client, s.party)][token]) for s, lookup in zip(servers, lookups, strict=True)]
        if all(o is not None for o in others):
            matched.append((token, *(o for o in others if o is not None)))
    parties = (client, *(s.party for s in servers))
    rows = assemble(parties, matched, [by_party[p].tokens for p in parties], padding)
    counts = {inp.party: len(inp.identifiers) for inp in inputs}
    change = EpochChange(added, removed, blinded=blinded_count, multiplications=blinded_count + len(added))
    return MatchResult(parties, rows, counts, bytes_exchanged=sum(len(v) for *_, v in added), matched=len(matched)), change
