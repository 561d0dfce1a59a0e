"""Build the cross-reference table: who is in every party's data, under a random match_id.

Per hash bucket, the client party runs PSI against each other party and
learns which of its identifiers every other party also holds. The matched
people are then paired across parties by their normalised identifier and
each gets a fresh random ``match_id``. Buckets change only how the work is
split: the result is the same for any bucket count.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .home_psi import HomeMatch
from .processes import die_with_parent
from .psi import PsiClient, PsiServer


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


def input_digest(inputs: Iterable[PartyInput], client: str, buckets: int, home: Iterable[str] = ()) -> str:
    """What the cross-reference depends on: every party's (token, identifier) pairs and the protocol settings.

    Equal digests mean the previous cross-reference is still right, so no
    elliptic-curve work is redone and the match_ids stay as they were.
    """
    digest = hashlib.sha256(f"client={client};buckets={buckets};v2".encode())  # v2: the cross-reference carries unit numbers
    for setup_sha256 in sorted(home):  # a home party's setup message stands for its identifiers
        digest.update(f"\0home={setup_sha256}".encode())
    for inp in sorted(inputs, key=lambda i: i.party):
        digest.update(f"\0party={inp.party}\0".encode())
        for token, identifier in sorted(zip(inp.tokens, inp.identifiers, strict=False)):
            digest.update(f"{token}\t{identifier}\n".encode())
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


def _server_half(parent: int, conn: Connection, buckets: dict[int, list[str]]) -> None:
    """One party's server half, in its own process: answers requests for its buckets with its own fresh keys."""
    die_with_parent(parent)
    while (message := conn.recv()) is not None:
        bucket, request, client_size = message
        server = PsiServer()
        setup = server.setup_message(buckets.get(bucket, []), client_size)
        conn.send((setup, server.answer(request)))
    conn.close()


def _client_half(parent: int, conns: list[Connection], buckets: list[tuple[int, list[str]]], results: Connection) -> None:
    """The client party's half, in its own process: per bucket, a fresh key, a request to every server, the intersection."""
    die_with_parent(parent)
    found: dict[int, list[int]] = {}
    exchanged = 0
    for bucket, items in buckets:
        still = set(range(len(items)))
        for conn in conns:
            client = PsiClient()
            request = client.request(items)
            conn.send((bucket, request, len(items)))
            setup, response = conn.recv()
            exchanged += len(setup) + len(request) + len(response)
            still &= set(client.intersection(setup, response))
        found[bucket] = sorted(still)
    for conn in conns:
        conn.send(None)
    results.send((found, exchanged))
    results.close()


def _run_lanes(client_jobs: list[tuple[int, list[str]]], server_sets: list[dict[int, list[str]]], lanes: int) -> tuple[dict[int, list[int]], int]:
    """Each lane: one client process and one process per server party, exchanging only serialized messages."""
    ctx = multiprocessing.get_context("spawn")
    processes, receivers = [], []
    for lane in range(lanes):
        jobs = client_jobs[lane::lanes]
        if not jobs:
            continue
        mine = {b for b, _ in jobs}
        client_ends = []
        for sets in server_sets:
            client_end, server_end = ctx.Pipe()
            processes.append(ctx.Process(target=_server_half, args=(os.getpid(), server_end, {b: v for b, v in sets.items() if b in mine}), daemon=True))
            client_ends.append(client_end)
        parent_end, child_end = ctx.Pipe(duplex=False)
        processes.append(ctx.Process(target=_client_half, args=(os.getpid(), client_ends, jobs, child_end), daemon=True))
        receivers.append(parent_end)
    for process in processes:
        process.start()
    found: dict[int, list[int]] = {}
    exchanged = 0
    try:
        for receiver in receivers:
            lane_found, lane_bytes = receiver.recv()
            found.update(lane_found)
            exchanged += lane_bytes
    except EOFError:
        raise RuntimeError("a PSI process ended without an answer (see the operator's log)") from None
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    return found, exchanged


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
    if servers:
        server_buckets = {s.party: _split(s, buckets) for s in servers}
        client_jobs = [(b, [client_input.identifiers[i] for i in client_buckets[b]]) for b in range(buckets) if client_buckets[b]]
        server_sets = [{b: [s.identifiers[i] for i in server_buckets[s.party][b]] for b in range(buckets)} for s in servers]
        lanes = max(1, min(workers or os.cpu_count() or 1, len(client_jobs)))
        found, exchanged = _run_lanes(client_jobs, server_sets, lanes) if client_jobs else ({}, 0)
        matched_client = [client_buckets[b][i] for b, _ in client_jobs for i in found.get(b, [])]
    else:
        matched_client, exchanged = list(range(len(client_input.identifiers))), 0
    matched_client = [i for i in matched_client if all(i in h.by_client_index for h in home)]

    # Pair the people PSI found across parties by their normalised identifier (every half of this step holds
    # its own party's; the operator's step already has them all), each getting one fresh random match_id.
    wanted = {client_input.identifiers[i]: i for i in matched_client}
    server_tokens = [{identifier: token for token, identifier in zip(s.tokens, s.identifiers, strict=False) if identifier in wanted} for s in servers]
    parties = (client, *(s.party for s in servers), *(h.party for h in home))
    rows: list[tuple[str, ...]] = []
    for identifier, i in wanted.items():
        others = [tokens[identifier] for tokens in server_tokens if identifier in tokens]
        if len(others) == len(server_tokens):
            rows.append((secrets.token_hex(16), client_input.tokens[i], *others, *(h.by_client_index[i] for h in home)))
    matched = len(rows)
    if padding:
        tokens_by_party = [client_input.tokens, *(s.tokens for s in servers), *(h.tokens for h in home)]
        rows.extend(_padding_rows(parties, tokens_by_party, {tok for row in rows for tok in row[1:]}))
        rows.sort(key=lambda row: row[0])  # match_ids are random: fake and real rows end up interleaved
    counts = {inp.party: len(inp.identifiers) for inp in inputs} | {h.party: len(h.tokens) for h in home}
    return MatchResult(parties, rows, counts, exchanged, matched)


def _padding_rows(parties: Sequence[str], tokens_by_party: Sequence[Sequence[str]], matched_tokens: set[str]) -> list[tuple[str, ...]]:
    """One fake row per unmatched identity: its party's real token, forged tokens for the others.

    Forged tokens are random 256-bit values in the same hex form as real
    tokens, so a reader of the table cannot tell fake rows from real ones;
    they exist in no party's staging data, so they can never join to it.
    """
    out = []
    for position, tokens in enumerate(tokens_by_party):
        for token in tokens:
            if token in matched_tokens:
                continue
            row = [secrets.token_hex(32) for _ in parties]
            row[position] = token
            out.append((secrets.token_hex(16), *row))
    return out
