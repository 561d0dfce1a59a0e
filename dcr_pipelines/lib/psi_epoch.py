"""Matching inside a key epoch: keys and blinded sets kept, so a new match does elliptic-curve work only for changed identities.

The commutative cipher behind our PSI: ``blind(k, x) = H(x)^k`` and
``reblind(j, blind(k, x)) == blind(k*j, x)``. Within an epoch every party
keeps one key. For the client C and each other party S the operator keeps
``H(x)^(kC*kS)`` for every identity x of C and of S (C's items reblinded by
S, S's items reblinded by C). Equal values are the same identity, so the
intersection and the pairing of tokens are a join; a new run blinds and
reblinds only the identities added since the last one (two scalar
multiplications each) and drops the removed ones.

Nothing here holds every identity: the kept values live in the operator's
matching schema (``store/key_epoch.py``), and a match streams each party's
identities and the kept tokens in token order side by side (``diff``),
blinding what is new a batch at a time (``blind_batch``). The database joins
the values. The operator runs every party's half here: the blinding workers
are one pool that serves the parties in turn (each task carries one key and
one party's items), so within the operator nothing separates the parties'
keys; a party that runs its own half keeps its key (``home_parties``, without
key epochs). No member role can read the matching schema, and the values are deleted when
the epoch ends (its keys with it). With ``key_epoch: run`` none of this is
used: every match draws fresh keys, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .processes import map_chunks
from .psi import blind, new_key, reblind

BATCH = 100_000  # new identities blinded per batch (about 30 MB in flight)
POOL_FROM = 2_000  # a worker pool costs more than a few thousand multiplications


@dataclass(frozen=True)
class New:
    """An identity of the owner that lacks a kept value for ``peers``."""

    token: str
    identifier: str
    peers: tuple[str, ...]


@dataclass(frozen=True)
class Gone:
    """A kept value of the owner for ``peer`` whose identity is no longer the owner's."""

    peer: str
    token: str


def config_of(parties: Iterable[str], client: str) -> str:
    """What an epoch is bound to: the client and the set of parties (another set starts a new epoch)."""
    return hashlib.sha256(f"client={client};parties={','.join(sorted(parties))};v1".encode()).hexdigest()


def new_keys(parties: Iterable[str]) -> dict[str, bytes]:
    """One fresh key per party: a new epoch."""
    return {party: new_key() for party in parties}


def pairs(client: str, servers: Sequence[str]) -> list[tuple[str, str]]:
    """The (owner, peer) value sets an epoch keeps: the client's items for each server, each server's for the client."""
    return [(client, s) for s in servers] + [(s, client) for s in servers]


def diff(owned: Iterable[tuple[str, str]], kept: Mapping[str, Iterable[str]]) -> Iterator[New | Gone]:
    """What the owner's identities ``owned`` ((token, identifier), ascending by token) lack against the tokens
    ``kept`` for each peer (ascending): a ``New`` per identity missing a value, a ``Gone`` per kept token no
    longer owned. One pass over sorted streams: memory holds one row of each."""
    peers = sorted(kept)
    streams = {p: iter(kept[p]) for p in peers}
    heads: dict[str, str | None] = {p: next(streams[p], None) for p in peers}
    last = ""
    for token, identifier in owned:
        if token <= last:
            raise ValueError(f"identities not in ascending token order at {token!r}")
        last = token
        missing = []
        for p in peers:
            while (head := heads[p]) is not None and head < token:
                yield Gone(p, head)
                heads[p] = _advance(streams[p], head)
            if head == token:
                heads[p] = _advance(streams[p], head)
            else:
                missing.append(p)
        if missing:
            yield New(token, identifier, tuple(missing))
    for p in peers:
        while (head := heads[p]) is not None:
            yield Gone(p, head)
            heads[p] = _advance(streams[p], head)


def _advance(stream: Iterator[str], previous: str) -> str | None:
    token = next(stream, None)
    if token is not None and token <= previous:
        raise ValueError(f"kept tokens not in ascending order at {token!r}")
    return token


def blind_batch(owner: str, batch: Sequence[New], keys: Mapping[str, bytes], pool: ProcessPoolExecutor | None,
                parts: int) -> Iterator[tuple[str, str, str, bytes]]:
    """(owner, peer, token, value) for each identity of ``batch`` and each peer it lacks: the owner blinds the
    identity once, each peer reblinds it."""
    singles = map_chunks(pool, blind, keys[owner], [n.identifier for n in batch], parts)
    for peer in sorted({p for n in batch for p in n.peers}):
        wanted = [i for i, n in enumerate(batch) if peer in n.peers]
        doubles = map_chunks(pool, reblind, keys[peer], [singles[i] for i in wanted], parts)
        for i, value in zip(wanted, doubles, strict=True):
            yield owner, peer, batch[i].token, value
