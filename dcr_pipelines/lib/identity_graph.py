"""Matching on several identifiers, and for some of the parties: one match_id per person for each set of parties.

Each party's identity *records* are the distinct combinations of its tokens and normalised identifiers, one of each
kind the collaboration matches on (None where a record lacks one), across the party's datasets. For every pair of
parties that some set needs and every kind, PSI (``matching.psi_jobs``: each half in its own process, a fresh key
per bucket, only serialized protocol messages between them) tells one of the two which of its identifiers the other
holds; the operator's step pairs those by identifier into *links* between the two parties' tokens.

A person is a connected group of tokens: the tokens of one record belong together, and links join parties. For a set
of parties S (every party, or the subset a query reads) only S's records and links count, so the people shared by
two parties never depend on a third party's data:

- ``one`` and ``any_of``: every link joins (people who share any identifier are one person);
- ``priority``: kinds in order; a link of a later kind between parties X and Y joins only if, as the groups stood
  before that kind, neither end's group already holds a token of the other party (a pair matched by email is not
  matched again by phone).

A group with a token of every party of S is one shared person: a fresh random ``match_id``, one row in S's
cross-reference (each party's first token, kinds in priority order) and one link row per token, which the matched
views join on (a row belongs to the person its tokens are in). Nothing here is released: the counts go to the
operator's metadata.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from . import matching

Rule = Literal["one", "any_of", "priority"]
Pair = tuple[str, str]  # (PSI client party, server party), in the order the pair runs


@dataclass(frozen=True)
class PartyRecords:
    """One party's distinct identity records: per record, (token, identifier) of each kind in ``kinds`` order."""

    party: str
    kinds: tuple[str, ...]
    records: Sequence[tuple[str | None, ...]]  # (token of kinds[0], identifier of kinds[0], token of kinds[1], ...)

    def identities(self, kind: int) -> dict[str, str]:
        """identifier -> token of one kind (by its index in ``kinds``)."""
        return {r[2 * kind + 1]: r[2 * kind] for r in self.records if r[2 * kind] is not None}  # type: ignore[misc]


@dataclass(frozen=True)
class Overlap:
    """The people shared by one set of parties."""

    parties: tuple[str, ...]
    rows: list[tuple[str | int, ...]]  # (match_id, first token of each party in ``parties`` order, unit)
    links: list[tuple[str, ...]]  # (match_id, party, token of each kind or ""): every record of every shared person

    @property
    def matched(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class GraphResult:
    overlaps: dict[tuple[str, ...], Overlap]
    links: dict[tuple[str, str, str], int]  # (party, party, kind) -> identifiers both hold
    input_counts: dict[str, int]
    bytes_exchanged: int = 0
    psi_jobs: int = 0


def pairs_needed(overlaps: Iterable[Sequence[str]], client: str) -> list[Pair]:
    """Every pair of parties inside some set, once, as (PSI client, server): the matching client when in the pair,
    else the one declared first (sets list parties in declaration order)."""
    out: list[Pair] = []
    for subset in overlaps:
        for i, x in enumerate(subset):
            for y in subset[i + 1:]:
                pair = (y, x) if y == client else (x, y)
                if pair not in out:
                    out.append(pair)
    return out


def digest(records: Iterable[PartyRecords], client: str, kinds: Sequence[str], rule: Rule,
           overlaps: Iterable[Sequence[str]], buckets: int) -> str:
    """What the cross-references depend on: every party's records and the match settings (equal: nothing to redo)."""
    h = hashlib.sha256(f"graph;client={client};kinds={','.join(kinds)};rule={rule};buckets={buckets};"
                       f"overlaps={'|'.join(','.join(s) for s in overlaps)};v1".encode())
    for party in sorted(records, key=lambda r: r.party):
        h.update(f"\0party={party.party}\0".encode())
        for record in sorted(tuple(v or "" for v in r) for r in party.records):
            h.update(("\t".join(record) + "\n").encode())
    return h.hexdigest()


def psi_links(records: Mapping[str, PartyRecords], pairs: Sequence[Pair], kinds: Sequence[str], buckets: int,
              workers: int | None = None) -> tuple[dict[tuple[str, str, str], list[tuple[str, str]]], int, int]:
    """PSI of each pair on each kind, hash bucket by bucket: ``{(client, server, kind): [(client token, server token)]}``,
    bytes exchanged, PSI jobs run."""
    identities = {(p, k): records[p].identities(i) for p in records for i, k in enumerate(kinds)}
    largest = max((len(v) for v in identities.values()), default=0)
    work = matching.work_buckets(buckets, largest)

    def split(values: Iterable[str]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(work)]
        for v in sorted(values):
            out[matching.bucket_of(v, work)].append(v)
        return out

    jobs = []
    for x, y in pairs:
        for kind in kinds:
            mine, theirs = identities[(x, kind)], identities[(y, kind)]
            if not mine or not theirs:
                continue
            for b, (client_items, server_items) in enumerate(zip(split(mine), split(theirs), strict=True)):
                if client_items and server_items:
                    jobs.append(((x, y, kind, b), client_items, [server_items]))
    links: dict[tuple[str, str, str], list[tuple[str, str]]] = {(x, y, k): [] for x, y in pairs for k in kinds}
    exchanged = 0
    by_tag = {tag: items for tag, items, _ in jobs}
    for tag, found, nbytes in matching.psi_jobs(iter(jobs), 1, matching.lanes_for(len(jobs), workers)):
        x, y, kind, _ = tag
        client_items = by_tag[tag]
        for i in found:
            identifier = client_items[i]
            links[(x, y, kind)].append((identities[(x, kind)][identifier], identities[(y, kind)][identifier]))
        exchanged += nbytes
    return links, exchanged, len(jobs)


Node = tuple[str, int]  # (party, index of one of its records)


class _Groups:
    """Union-find over records (a record is its own group until it joins one), with the parties each group holds."""

    def __init__(self) -> None:
        self.parent: dict[Node, Node] = {}
        self._held: dict[Node, frozenset[str]] = {}

    def held(self, root: Node) -> frozenset[str]:
        return self._held.get(root) or frozenset((root[0],))

    def joined(self, root: Node) -> frozenset[str]:
        """The parties of a group that was joined (empty for a record still alone)."""
        return self._held.get(root, frozenset())

    def find(self, node: Node) -> Node:
        parent = self.parent
        root = node
        while (up := parent.get(root, root)) != root:
            root = up
        while node != root:
            node, parent[node] = parent[node], root
        return root

    def union(self, a: Node, b: Node, only_disjoint: bool = False) -> None:
        """Join the groups of ``a`` and ``b``; with ``only_disjoint``, only if no party has records in both."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        held_a, held_b = self.held(ra), self.held(rb)
        if only_disjoint and held_a & held_b:
            return
        low, high = min(ra, rb), max(ra, rb)  # deterministic roots
        self.parent[high] = low
        self._held.pop(high, None)
        self._held[low] = held_a | held_b


def resolve(subset: Sequence[str], records: Mapping[str, PartyRecords], links: Mapping[tuple[str, str, str], Sequence[tuple[str, str]]],
            kinds: Sequence[str], rule: Rule, unit_party: str) -> Overlap:
    """The people shared by every party of ``subset``, from its parties' records and the links among them only.

    The nodes are records. Kind by kind (priority order), records join when they share a token of that kind (two
    records of one party) or a link of that kind joins their tokens (two parties). Under ``priority`` the first kind
    joins every such pair; a later kind joins two groups only if no party has records in both, taking its links in a
    fixed order (parties in ``subset`` order, then tokens), so two records of one party are one person only when they
    share the first kind's identifier, and a pair of parties' records matched by an earlier kind is not matched again.
    """
    members, order = set(subset), {p: i for i, p in enumerate(subset)}
    groups = _Groups()
    holding: dict[tuple[str, int, str], list[int]] = defaultdict(list)  # (party, kind, token) -> its records
    for party in subset:
        for index, record in enumerate(records[party].records):
            for kind in range(len(kinds)):
                if (token := record[2 * kind]) is not None:
                    holding[(party, kind, token)].append(index)
    for kind, name in enumerate(kinds):
        edges: list[tuple[tuple[int, int, str, str], Node, Node]] = []
        for (party, k, token), held in holding.items():
            if k == kind and len(held) > 1:
                edges.extend(((order[party], order[party], token, token), (party, held[0]), (party, other)) for other in held[1:])
        for (x, y, link_kind), found in links.items():
            if link_kind == name and x in members and y in members:
                for tx, ty in found:
                    edges.extend(((order[x], order[y], tx, ty), (x, rx), (y, ry)) for rx in holding[(x, kind, tx)] for ry in holding[(y, kind, ty)])
        only_disjoint = rule == "priority" and kind > 0
        for _, a, b in sorted(edges) if only_disjoint else edges:
            groups.union(a, b, only_disjoint)
    people: dict[Node, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for party in subset:
        for index in range(len(records[party].records)):
            root = groups.find((party, index))
            if members <= groups.joined(root):  # a set of two or more parties: a record alone is no shared person
                people[root][party].append(index)
    rows: list[tuple[str | int, ...]] = []
    out_links: list[tuple[str, ...]] = []
    for held_by in people.values():
        if not members <= held_by.keys():
            continue
        match_id = secrets.token_hex(16)
        first: dict[str, str] = {}
        for party in subset:
            tokens = [(k, record[2 * k]) for i in held_by[party] for k in range(len(kinds)) if (record := records[party].records[i])[2 * k] is not None]
            first[party] = str(min(tokens)[1])  # the first kind's smallest token
            out_links.extend((match_id, party, *(records[party].records[i][2 * k] or "" for k in range(len(kinds)))) for i in sorted(held_by[party]))
        rows.append((match_id, *(first[p] for p in subset), matching.unit_of(first[unit_party])))
    rows.sort(key=lambda r: str(r[0]))
    return Overlap(tuple(subset), rows, out_links)


def match(records: Sequence[PartyRecords], overlaps: Sequence[Sequence[str]], client: str, kinds: Sequence[str], rule: Rule,
          buckets: int = 1, workers: int | None = None) -> GraphResult:
    """PSI per pair and kind, then each set's shared people (see the module's docstring)."""
    by_party = {r.party: r for r in records}
    missing = {p for s in overlaps for p in s} - by_party.keys()
    if missing:
        raise ValueError(f"no records of {sorted(missing)}")
    pairs = pairs_needed(overlaps, client)
    links, exchanged, jobs = psi_links(by_party, pairs, kinds, buckets, workers)
    out = {}
    for subset in overlaps:
        out[tuple(subset)] = resolve(subset, by_party, links, kinds, rule, client if client in subset else subset[0])
    counts = {r.party: len(r.records) for r in records}
    return GraphResult(out, {k: len(v) for k, v in links.items()}, counts, exchanged, jobs)
