"""Build the cross-reference table: who is in every party's data, under a random match_id.

Per hash bucket, the client party runs PSI against each other party and
learns which of its identifiers every other party also holds. The matched
people are then paired across parties by a tag keyed with the
collaboration's pairing secret (held by the parties' processes, never
stored), and each pair gets a fresh random ``match_id``. Buckets change
only how the work is split: the result is the same for any bucket count.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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

    @property
    def matched(self) -> int:
        return len(self.rows)


def bucket_of(identifier: str, buckets: int) -> int:
    """A stable bucket for an identifier; each party computes it on its own side."""
    if buckets == 1:
        return 0
    digest = hashlib.sha256(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def pairing_tag(pairing_key: bytes, identifier: str) -> bytes:
    return hmac.new(pairing_key, identifier.encode("utf-8"), hashlib.sha256).digest()


def _split(inp: PartyInput, buckets: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(buckets)]
    for i, identifier in enumerate(inp.identifiers):
        out[bucket_of(identifier, buckets)].append(i)
    return out


def match(inputs: Sequence[PartyInput], client: str, pairing_key: bytes, buckets: int = 1) -> MatchResult:
    """Intersect every party's identifiers with PSI and pair the matches under random match_ids."""
    by_party = {inp.party: inp for inp in inputs}
    if client not in by_party:
        raise ValueError(f"matching client {client!r} has no input")
    if len(by_party) < 2:
        raise ValueError("matching needs at least two parties")
    client_input = by_party[client]
    servers = [inp for inp in inputs if inp.party != client]
    client_buckets = _split(client_input, buckets)
    server_buckets = {s.party: _split(s, buckets) for s in servers}
    exchanged = 0
    matched_client: list[int] = []
    for b in range(buckets):
        indices = client_buckets[b]
        if not indices:
            continue
        items = [client_input.identifiers[i] for i in indices]
        still = set(range(len(items)))
        for server_input in servers:
            server_items = [server_input.identifiers[i] for i in server_buckets[server_input.party][b]]
            client_half = PsiClient()
            server_half = PsiServer()
            setup = server_half.setup_message(server_items, len(items))
            request = client_half.request(items)
            response = server_half.answer(request)
            exchanged += len(setup) + len(request) + len(response)
            still &= set(client_half.intersection(setup, response))
        matched_client.extend(indices[i] for i in sorted(still))

    client_tags = {pairing_tag(pairing_key, client_input.identifiers[i]): client_input.tokens[i] for i in matched_client}
    server_tags: dict[str, Mapping[bytes, str]] = {}
    for server_input in servers:
        tags = {}
        for token, identifier in zip(server_input.tokens, server_input.identifiers):
            tag = pairing_tag(pairing_key, identifier)
            if tag in client_tags:
                tags[tag] = token
        server_tags[server_input.party] = tags
    parties = (client, *(s.party for s in servers))
    rows = []
    for tag, client_token in client_tags.items():
        others = [server_tags[s.party].get(tag) for s in servers]
        if all(t is not None for t in others):
            rows.append((secrets.token_hex(16), client_token, *others))  # type: ignore[arg-type]
    counts = {inp.party: len(inp.identifiers) for inp in inputs}
    return MatchResult(parties, rows, counts, exchanged)
