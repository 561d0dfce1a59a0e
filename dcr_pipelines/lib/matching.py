"""Build the cross-reference table: who is in every party's data, under a random match_id.

Per hash bucket, the client party runs PSI against each other party and
learns which of its identifiers every other party also holds. The matched
people are then paired across parties by their normalised identifier and
each gets a fresh random ``match_id``. Buckets change only how the work is
split: the result is the same for any bucket count.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import secrets
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

from .home_psi import HomeMatch
from .processes import die_with_parent
from .psi import PsiClient, PsiServer

J = TypeVar("J")


@dataclass(frozen=True)
class PartyInput:
    """One party's distinct (token, normalised identifier) pairs."""

    party: str
    tokens: Sequence[str]
    identifiers: Sequence[str]


@dataclass(frozen=True)
class MatchResult:
    parties: tuple[str, ...]
    rows: list[tuple[str, ...]]  # (match_id, token of parties[0], token of parties[1], ...)
    input_counts: dict[str, int]
    bytes_exchanged: int
    matched: int


def unit_of(client_token: str) -> int:
    """A person's stable unit number: 64 bits of SHA-256 of the matching client's token.

    match_ids are fresh for every new cross-reference; the difference checks
    need to recognise the same person across them, so every row also carries
    this number (the client's token is keyed and stable while its key is).
    It is not derived from an identifier and reaches no member.
    """
    return int.from_bytes(hashlib.sha256(b"dcr-unit\0" + client_token.encode()).digest()[:8], "big", signed=True)


class InputDigest:
    """The input digest built a party at a time from rows already sorted by (token, identifier), in code-point order.

    Lets the matching step digest identities streamed from the database (sorted there with ``collate "C"``, which is
    the same order) without holding them; ``input_digest`` is the same digest of inputs held in memory.
    """

    def __init__(self, client: str, buckets: int, home: Iterable[str] = (), padding: bool = False) -> None:
        # v2: the cross-reference carries unit numbers; padding changes the table, so turning it on or off rebuilds it
        self._hash = hashlib.sha256(f"client={client};buckets={buckets};{'padding;' if padding else ''}v2".encode())
        for setup_sha256 in sorted(home):  # a home party's setup message stands for its identifiers
            self._hash.update(f"\0home={setup_sha256}".encode())
        self._last_party = ""

    def party(self, party: str, sorted_pairs: Iterable[tuple[str, str]]) -> int:
        """Add one party's (token, identifier) pairs, sorted; parties in name order. Returns how many pairs there were."""
        if party <= self._last_party:
            raise ValueError(f"parties must come in name order: {party!r} after {self._last_party!r}")
        self._last_party = party
        self._hash.update(f"\0party={party}\0".encode())
        count = 0
        for token, identifier in sorted_pairs:
            self._hash.update(f"{token}\t{identifier}\n".encode())
            count += 1
        return count

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def input_digest(inputs: Iterable[PartyInput], client: str, buckets: int, home: Iterable[str] = (), padding: bool = False) -> str:
    """What the cross-reference depends on: every party's (token, identifier) pairs and the protocol settings.

    Equal digests mean the previous cross-reference is still right, so no
    elliptic-curve work is redone and the match_ids stay as they were.
    """
    digest = InputDigest(client, buckets, home, padding)
    for inp in sorted(inputs, key=lambda i: i.party):
        digest.party(inp.party, sorted(zip(inp.tokens, inp.identifiers, strict=False)))
    return digest.hexdigest()


def bucket_digest(inputs: Iterable[PartyInput], client: str, buckets: int, bucket: int) -> str:
    """What one bucket's matches depend on: that bucket's part of every party's input."""
    return hashlib.sha256(f"{input_digest(inputs, client, buckets)}:bucket={bucket}".encode()).hexdigest()


def bucket_of(identifier: str, buckets: int) -> int:
    """A stable bucket for an identifier; each party computes it on its own side."""
    if buckets == 1:
        return 0
    digest = hashlib.sha256(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def bucket_sql(column: str, buckets: int) -> str:
    """``bucket_of`` in SQL (core PostgreSQL 12+): the first 8 bytes of SHA-256 as an unsigned integer, modulo ``buckets``.

    Lets a bucket's step read only its own identifiers; ``column`` is an
    already-quoted identifier.
    """
    signed = f"('x' || substr(encode(sha256(convert_to({column}, 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint"
    return f"mod(case when {signed} < 0 then {signed}::numeric + 18446744073709551616 else {signed}::numeric end, {int(buckets)})"


def split(inputs: Sequence[PartyInput], buckets: int) -> list[list[PartyInput]]:
    """Each party's input cut into its buckets (bucket b of every party is what bucket b's step reads)."""
    out: list[list[PartyInput]] = [[] for _ in range(buckets)]
    for inp in inputs:
        parts = _split(inp, buckets)
        for b, indices in enumerate(parts):
            out[b].append(PartyInput(inp.party, [inp.tokens[i] for i in indices], [inp.identifiers[i] for i in indices]))
    return out


def assemble(
    parties: Sequence[str], pairs: Sequence[tuple[str, ...]], tokens_by_party: Sequence[Sequence[str]], padding: bool = False,
) -> list[tuple[str, ...]]:
    """Rows of the cross-reference from matched token tuples (in ``parties`` order): a fresh random match_id each, padding if asked."""
    rows = [(secrets.token_hex(16), *pair) for pair in pairs]
    if padding:
        rows.extend(_padding_rows(parties, tokens_by_party, {tok for row in rows for tok in row[1:]}))
        rows.sort(key=lambda row: row[0])
    return rows


def _split(inp: PartyInput, buckets: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(buckets)]
    for i, identifier in enumerate(inp.identifiers):
        out[bucket_of(identifier, buckets)].append(i)
    return out


def _server_half(parent: int, jobs: Connection, client: Connection) -> None:
    """One party's server half, in its own process: per bucket, its items from the operator and a fresh key to answer the client."""
    die_with_parent(parent)
    while (items := jobs.recv()) is not None:
        request, client_size = client.recv()
        server = PsiServer()
        setup = server.setup_message(items, client_size)
        client.send((setup, server.answer(request)))


def _client_half(parent: int, jobs: Connection, servers: list[Connection]) -> None:
    """The client party's half, in its own process: per bucket, a fresh key, a request to every server, the intersection."""
    die_with_parent(parent)
    while (items := jobs.recv()) is not None:
        still = set(range(len(items)))
        exchanged = 0
        for conn in servers:
            client = PsiClient()
            request = client.request(items)
            conn.send((request, len(items)))
            setup, response = conn.recv()
            exchanged += len(setup) + len(request) + len(response)
            still &= set(client.intersection(setup, response))
        jobs.send((sorted(still), exchanged))


class _Lane:
    """One client process and one process per server party; they exchange only serialized protocol messages."""

    def __init__(self, ctx: Any, servers: int) -> None:
        self.server_jobs: list[Connection] = []
        client_ends, self.processes = [], []
        for _ in range(servers):
            jobs_end, server_jobs = ctx.Pipe(duplex=False)
            client_end, server_end = ctx.Pipe()
            self.processes.append(ctx.Process(target=_server_half, args=(os.getpid(), jobs_end, server_end), daemon=True))
            self.server_jobs.append(server_jobs)
            client_ends.append(client_end)
        self.client, client_jobs = ctx.Pipe()
        self.processes.append(ctx.Process(target=_client_half, args=(os.getpid(), client_jobs, client_ends), daemon=True))
        for process in self.processes:
            process.start()

    def submit(self, client_items: list[str], server_items: Sequence[list[str]]) -> None:
        for conn, items in zip(self.server_jobs, server_items, strict=True):
            conn.send(items)
        self.client.send(client_items)

    def close(self) -> None:
        for conn in [*self.server_jobs, self.client]:
            with contextlib.suppress(OSError):  # a process that died has closed its end
                conn.send(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()


def psi_jobs(jobs: Iterable[tuple[J, list[str], Sequence[list[str]]]], servers: int, lanes: int) -> Generator[tuple[J, list[int], int]]:
    """PSI of each job ``(tag, client items, each server's items)``: yields ``(tag, indices of the client items every
    server holds, bytes exchanged)`` as lanes finish, in any order.

    At most ``lanes`` jobs are in flight (one per lane), and ``jobs`` is read only as lanes free up, so a caller that
    streams buckets from the database holds a few buckets at a time, never every identity. A job without client items
    matches nothing and needs no lane.
    """
    ctx = multiprocessing.get_context("spawn")
    pending = iter(jobs)
    started: list[_Lane] = []
    idle: list[_Lane] = []
    busy: dict[Connection, tuple[_Lane, J]] = {}
    try:
        while True:
            while len(busy) < lanes and (job := next(pending, None)) is not None:
                tag, client_items, server_items = job
                if not client_items or not servers:
                    yield tag, ([] if servers else list(range(len(client_items)))), 0
                    continue
                if not idle:
                    started.append(_Lane(ctx, servers))
                    idle.append(started[-1])
                lane = idle.pop()
                try:
                    lane.submit(client_items, server_items)
                except OSError:
                    raise RuntimeError("a PSI process ended without an answer (see the operator's log)") from None
                busy[lane.client] = (lane, tag)
            if not busy:
                return
            for ready in wait(list(busy)):
                lane, tag = busy.pop(ready)  # type: ignore[arg-type]  # wait() returns the connections it was given
                try:
                    found, exchanged = lane.client.recv()
                except EOFError:
                    raise RuntimeError("a PSI process ended without an answer (see the operator's log)") from None
                idle.append(lane)
                yield tag, found, exchanged
    finally:
        for lane in started:
            lane.close()


def pair(client_input: PartyInput, servers: Sequence[PartyInput], matched: Iterable[int], home: Sequence[HomeMatch] = ()) -> list[tuple[str, ...]]:
    """The token tuples (client, each server, each home party) of the people PSI found, paired by normalised identifier.

    Every half of the step holds its own party's identifiers; the operator's step already has them all. ``matched``
    indexes the client's input; a person counts only if every party holds them.
    """
    wanted = {client_input.identifiers[i]: i for i in matched if all(i in h.by_client_index for h in home)}
    server_tokens = [{identifier: token for token, identifier in zip(s.tokens, s.identifiers, strict=False) if identifier in wanted} for s in servers]
    out = []
    for identifier, i in wanted.items():
        others = [tokens[identifier] for tokens in server_tokens if identifier in tokens]
        if len(others) == len(server_tokens):
            out.append((client_input.tokens[i], *others, *(h.by_client_index[i] for h in home)))
    return out


def lanes_for(jobs: int, workers: int | None = None) -> int:
    """How many PSI lanes: one per core (or ``workers``), never more than there are jobs."""
    return max(1, min(workers or os.cpu_count() or 1, jobs))


def match(
    inputs: Sequence[PartyInput],
    client: str,
    buckets: int = 1,
    workers: int | None = None,
    padding: bool = False,
    home: Sequence[HomeMatch] = (),
) -> MatchResult:
    """Intersect every party's identifiers with PSI and pair the matches under random match_ids.

    Each party's half runs in its own process with its own fresh key per
    bucket, and the halves exchange only serialized protocol messages over
    pipes. Buckets are spread over ``workers`` lanes (default: one per core),
    each lane a client process and one process per server party. Parties
    at home (``home``) have already answered the client's request; their
    side arrives as the token they hold for each client item.
    """
    by_party = {inp.party: inp for inp in inputs}
    if client not in by_party:
        raise ValueError(f"matching client {client!r} has no input")
    if len(by_party) + len(home) < 2:
        raise ValueError("matching needs at least two parties")
    client_input = by_party[client]
    servers = [inp for inp in inputs if inp.party != client]
    client_buckets = _split(client_input, buckets)
    server_buckets = [_split(s, buckets) for s in servers]
    jobs = [(b, [client_input.identifiers[i] for i in client_buckets[b]], [[s.identifiers[i] for i in sb[b]] for s, sb in zip(servers, server_buckets, strict=True)])
            for b in range(buckets) if client_buckets[b]]
    matched_client: list[int] = []
    exchanged = 0
    for b, found, nbytes in psi_jobs(jobs, len(servers), lanes_for(len(jobs), workers)):
        matched_client.extend(client_buckets[b][i] for i in found)
        exchanged += nbytes
    parties = (client, *(s.party for s in servers), *(h.party for h in home))
    pairs = pair(client_input, servers, sorted(matched_client), home)
    rows = assemble(parties, pairs, [client_input.tokens, *(s.tokens for s in servers), *(h.tokens for h in home)], padding)
    counts = {inp.party: len(inp.identifiers) for inp in inputs} | {h.party: len(h.tokens) for h in home}
    return MatchResult(parties, rows, counts, exchanged, len(pairs))


@dataclass(frozen=True)
class BucketMatch:
    """One bucket's part of the cross-reference: its rows (match_id first, padding included) and how many are real."""

    bucket: int
    rows: list[tuple[str, ...]]
    matched: int
    bytes_exchanged: int


def match_buckets(parts: Iterable[tuple[int, Sequence[PartyInput]]], parties: Sequence[str], lanes: int,
                  padding: bool = False) -> Generator[BucketMatch]:
    """The cross-reference bucket by bucket: ``parts`` yields ``(bucket, every party's input of that bucket)``, in
    ``parties`` order, the PSI client first.

    The same protocol as ``match`` (fresh keys per bucket, each half in its own process), but nothing outlives its
    bucket: a bucket's rows are paired, padded and handed back as soon as its PSI is done, and ``parts`` is read only
    as lanes free up. The caller writes each bucket and drops it, so memory holds a few buckets, not every identity.
    Padding is per bucket, which pads exactly the same identities as padding the whole.
    """
    if len(parties) < 2:
        raise ValueError("matching needs at least two parties")

    def jobs() -> Iterator[tuple[tuple[int, Sequence[PartyInput]], list[str], list[list[str]]]]:
        for bucket, inputs in parts:
            if tuple(inp.party for inp in inputs) != tuple(parties):
                raise ValueError(f"bucket {bucket}: inputs of {[inp.party for inp in inputs]}, expected {list(parties)}")
            yield (bucket, inputs), list(inputs[0].identifiers), [list(s.identifiers) for s in inputs[1:]]

    for (bucket, inputs), found, exchanged in psi_jobs(jobs(), len(parties) - 1, lanes):
        pairs = pair(inputs[0], inputs[1:], found)
        rows = assemble(parties, pairs, [inp.tokens for inp in inputs], padding)
        yield BucketMatch(bucket, rows, len(pairs), exchanged)


def _padding_rows(parties: Sequence[str], tokens_by_party: Sequence[Sequence[str]], matched_tokens: set[str]) -> list[tuple[str, ...]]:
    out = []
    for position, tokens in enumerate(tokens_by_party):
        out.extend(padding_rows(len(parties), position, [t for t in tokens if t not in matched_tokens]))
    return out


def padding_rows(parties: int, position: int, unmatched: Iterable[str]) -> list[tuple[str, ...]]:
    """One fake row per unmatched identity of the party at ``position``: its real token, forged tokens for the others.

    Forged tokens are random 256-bit values in the same hex form as real
    tokens, so a reader of the table cannot tell fake rows from real ones;
    they exist in no party's staging data, so they can never join to it.
    """
    out = []
    for token in unmatched:
        row = [secrets.token_hex(32) for _ in range(parties)]
        row[position] = token
        out.append((secrets.token_hex(16), *row))
    return out


BUCKET_IDENTITIES = 250_000  # about 60 MB of one party's identities in Python, plus its PSI messages


def work_buckets(configured: int, largest: int) -> int:
    """Buckets for a streamed match: the policy's count, or more when a party has more than ``BUCKET_IDENTITIES``
    identities per bucket (the result is identical for any count; only memory and message sizes change)."""
    return max(configured, -(-largest // BUCKET_IDENTITIES))
