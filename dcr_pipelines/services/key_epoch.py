"""A match inside a key epoch (``lib/psi_epoch.py``), streamed: memory holds a batch, not every identity.

For each party in turn, its identities (ascending by token, from the caller) and the tokens kept for each of its
peers (ascending, from the database) are read side by side. Identities without a kept value are blinded a batch at
a time and their values written; kept values of identities that are gone are deleted. The database then joins the
client's values with each server's to give the matched people, which go straight into the new cross-reference, and
(with padding) one row per unmatched identity. All of it is one transaction on the caller's connection: a run
killed half-way leaves the previous epoch state and cross-reference as they were.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import TypeVar

import psycopg

from ..lib import matching, psi_epoch
from ..lib.processes import worker_pool
from ..store import key_epoch
from ..store import matching as store_matching

T = TypeVar("T")
Owned = Callable[[str], AbstractContextManager[Iterable[tuple[str, str]]]]


@dataclass(frozen=True)
class EpochMatch:
    matched: int
    rows: int  # cross-reference rows written (padding included)
    started: bool  # a new epoch began (new keys)
    blinded: int  # identities blinded this run
    multiplications: int  # scalar multiplications this run (a blinding, and a reblinding per peer)
    removed: int  # kept values deleted (their identities are gone)
    bytes_exchanged: int  # bytes of the values reblinded for a peer


def match(conn: psycopg.Connection, collab: str, client: str, servers: Sequence[str], owned: Owned, *, seconds: int,
          padding: bool, digest: str, workers: int | None = None) -> EpochMatch:
    """The cross-reference of ``client`` and ``servers`` inside the current epoch (a new one if it ended or the
    parties changed); ``owned(party)`` gives the party's (token, identifier) pairs ascending by token. Records
    the build under ``digest``."""
    parties = [client, *servers]
    config = psi_epoch.config_of(parties, client)
    keys = key_epoch.current_keys(conn, collab, config, seconds)
    started = keys is None
    with store_matching.replacing_cross_reference(conn, collab, parties, client, shuffled=padding) as writer:
        if keys is None:
            keys = psi_epoch.new_keys(parties)
            key_epoch.start(conn, collab, config, keys)
        update = _Update(conn, collab, keys, workers)
        try:
            for owner in parties:
                update.party(owner, servers if owner == client else [client], owned)
        finally:
            update.close()
        update.removals.apply()
        key_epoch.analyze(conn, collab)
        matched = 0
        with key_epoch.matches(conn, collab, client, servers) as rows:
            for chunk in _batches(rows, psi_epoch.BATCH):
                writer.write([(secrets.token_hex(16), *row) for row in chunk])
                matched += len(chunk)
        if padding:
            key_epoch.analyze(conn, collab, writer.table)
            for position, party in enumerate(parties):
                peer = servers[0] if party == client else client
                with key_epoch.unmatched(conn, collab, party, peer, writer.table, writer.columns[1 + position]) as tokens:
                    for part in _batches(tokens, psi_epoch.BATCH):
                        writer.write(matching.padding_rows(len(parties), position, part))
        store_matching.record_build(conn, collab, digest, matched)
    return EpochMatch(matched, writer.rows, started, update.blinded, update.multiplications, update.removals.count, update.exchanged)


class _Update:
    """Brings the kept values up to the parties' current identities, a batch at a time."""

    def __init__(self, conn: psycopg.Connection, collab: str, keys: dict[str, bytes], workers: int | None) -> None:
        self.conn, self.collab, self.keys = conn, collab, keys
        self.parts = workers or os.cpu_count() or 1
        self.pool: ProcessPoolExecutor | None = None
        self.removals = key_epoch.Removals(conn, collab)
        self.blinded = self.multiplications = self.exchanged = 0

    def party(self, owner: str, peers: Sequence[str], owned: Owned) -> None:
        with ExitStack() as stack:
            kept = {p: stack.enter_context(key_epoch.kept_tokens(self.conn, self.collab, owner, p)) for p in peers}
            identities = stack.enter_context(owned(owner))
            new: list[psi_epoch.New] = []
            gone: list[tuple[str, str, str]] = []
            for item in psi_epoch.diff(identities, kept):
                if isinstance(item, psi_epoch.Gone):
                    gone.append((owner, item.peer, item.token))
                    if len(gone) >= psi_epoch.BATCH:
                        self.removals.add(gone)
                        gone = []
                else:
                    new.append(item)
                    if len(new) >= psi_epoch.BATCH:
                        self._blind(owner, new)
                        new = []
            self._blind(owner, new)
            self.removals.add(gone)

    def _blind(self, owner: str, batch: list[psi_epoch.New]) -> None:
        if not batch:
            return
        if self.pool is None and self.parts > 1 and len(batch) >= psi_epoch.POOL_FROM:
            self.pool = worker_pool(self.parts)
        self.exchanged += key_epoch.add(self.conn, self.collab, psi_epoch.blind_batch(owner, batch, self.keys, self.pool, self.parts))
        self.blinded += len(batch)
        self.multiplications += len(batch) + sum(len(n.peers) for n in batch)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter); ``itertools.batched`` from Python 3.12."""
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part
