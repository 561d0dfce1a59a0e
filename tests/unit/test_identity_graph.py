"""Several identifiers per person and overlaps of some of the parties (lib/identity_graph.py), real openmined-psi,
against a pandas reference built a different way (merges on identifier values, components by label propagation).

People are generated with random identifier subsets in each party (email, phone, both; a few shared family phones
and typos), for 2, 3 and 4 parties and every subset of them.
"""

from __future__ import annotations

import hashlib
import itertools
import random

import pandas as pd
import pytest

from dcr_pipelines.lib import identity_graph
from dcr_pipelines.lib.identity_graph import PartyRecords

KINDS = ("email", "phone")


def _token(party: str, kind: str, identifier: str) -> str:
    return hashlib.sha256(f"{party}\0{kind}\0{identifier}".encode()).hexdigest()  # a keyed token, per party


def _people(rng: random.Random, parties: list[str], n: int, family_phones: int = 0) -> dict[str, pd.DataFrame]:
    """Each party's records: a random share of n people, each with email, phone or both (a family phone now and then)."""
    people = [(f"p{i}@example.com", f"+1555{i:07d}") for i in range(n)]
    families = [f"+1444{i:07d}" for i in range(family_phones)]
    out = {}
    for party in parties:
        rows = []
        for email, phone in people:
            if rng.random() < 0.4:
                continue
            if families and rng.random() < 0.2:
                phone = rng.choice(families)
            has = rng.choice(["email", "phone", "both", "both"])
            rows.append({"email": email if has != "phone" else None, "phone": phone if has != "email" else None})
        out[party] = pd.DataFrame(rows, columns=list(KINDS)).drop_duplicates()
    return out


def _records(frames: dict[str, pd.DataFrame]) -> list[PartyRecords]:
    out = []
    for party, frame in frames.items():
        records = []
        for raw_email, raw_phone in frame.itertuples(index=False):
            email, phone = (None if pd.isna(v) else str(v) for v in (raw_email, raw_phone))
            records.append((_token(party, "email", email) if email else None, email,
                            _token(party, "phone", phone) if phone else None, phone))
        out.append(PartyRecords(party, KINDS, records))
    return out


def _reference(frames: dict[str, pd.DataFrame], subset: tuple[str, ...]) -> set[frozenset[tuple[str, str]]]:
    """The shared people of ``subset`` under any_of as sets of (party, token), by pandas: merges and label propagation."""
    nodes = pd.concat([
        pd.DataFrame({"party": p, "kind": k, "identifier": frames[p][k].dropna().unique()}) for p in subset for k in KINDS
    ], ignore_index=True)
    nodes["node"] = nodes.index
    key = nodes.set_index(["party", "kind", "identifier"])["node"]
    inner = []  # tokens of one record belong together
    for p in subset:
        both = frames[p].dropna()
        inner.append(pd.DataFrame({"a": key.loc[[(p, "email", e) for e in both["email"]]].to_numpy(),
                                   "b": key.loc[[(p, "phone", ph) for ph in both["phone"]]].to_numpy()}))
    inner_edges = pd.concat(inner, ignore_index=True) if inner else pd.DataFrame({"a": [], "b": []})

    def cross(kind: str) -> pd.DataFrame:
        found = []
        for x, y in itertools.combinations(subset, 2):
            m = nodes[(nodes.party == x) & (nodes.kind == kind)].merge(nodes[(nodes.party == y) & (nodes.kind == kind)], on="identifier")
            found.append(pd.DataFrame({"a": m["node_x"], "b": m["node_y"]}))
        return pd.concat(found, ignore_index=True)

    def components(edges: pd.DataFrame) -> pd.Series:
        """Each node's smallest node number in its component: labels lowered along edges until no edge joins two labels."""
        label = pd.Series(nodes["node"].to_numpy(), index=nodes["node"].to_numpy())
        a, b = edges["a"].astype(int).to_numpy(), edges["b"].astype(int).to_numpy()
        while True:
            la, lb = label.loc[a].to_numpy(), label.loc[b].to_numpy()
            low = pd.concat([pd.Series(la.clip(max=lb), index=la), pd.Series(la.clip(max=lb), index=lb)]).groupby(level=0).min()
            new = pd.concat([label, label.map(low).fillna(label).astype(int)], axis=1).min(axis=1)
            if new.equals(label):
                return label
            label = new

    edges = pd.concat([inner_edges, *(cross(kind) for kind in KINDS)], ignore_index=True)
    label = components(edges)
    out = set()
    tokens = nodes.assign(c=label.loc[nodes["node"]].to_numpy())
    for _, group in tokens.groupby("c"):
        if set(group["party"]) >= set(subset):
            out.add(frozenset((p, _token(p, k, i)) for p, k, i in group[["party", "kind", "identifier"]].itertuples(index=False)))
    return out


def _result(overlap: identity_graph.Overlap) -> set[frozenset[tuple[str, str]]]:
    """Each shared person as the set of (party, token) of its records."""
    by_id: dict[str, set[tuple[str, str]]] = {}
    for match_id, party, *tokens in overlap.links:
        by_id.setdefault(match_id, set()).update((party, t) for t in tokens if t)
    assert len(by_id) == overlap.matched == len({row[0] for row in overlap.rows})
    return {frozenset(v) for v in by_id.values()}


@pytest.mark.parametrize(("parties", "seed"), [(2, 1), (3, 3), (4, 5)])
def test_any_of_equals_the_pandas_reference_for_every_subset_of_parties(parties: int, seed: int) -> None:
    rng = random.Random(seed)
    names = ["bank", "retailer", "telecom", "airline"][:parties]
    frames = _people(rng, names, 120, family_phones=6)
    subsets = [s for size in range(2, parties + 1) for s in itertools.combinations(names, size)]
    result = identity_graph.match(_records(frames), subsets, names[0], KINDS, "any_of", buckets=2)
    for subset in subsets:
        expected = _reference(frames, subset)
        assert _result(result.overlaps[subset]) == expected, subset
        assert expected, "the generated people share someone in every subset"


@pytest.mark.parametrize(("parties", "seed"), [(2, 2), (3, 4), (4, 6)])
def test_priority_joins_one_partys_records_only_by_the_first_identifier_and_never_more_than_any_of(parties: int, seed: int) -> None:
    """Generated people with shared household phones, every subset: under priority, two records of one party are one
    person only when they share an email; every priority person lies inside an any_of person; the result does not
    depend on how the PSI work was split."""
    rng = random.Random(seed)
    names = ["bank", "retailer", "telecom", "airline"][:parties]
    frames = _people(rng, names, 120, family_phones=6)
    subsets = [s for size in range(2, parties + 1) for s in itertools.combinations(names, size)]
    records = _records(frames)
    priority = identity_graph.match(records, subsets, names[0], KINDS, "priority", buckets=1)
    again = identity_graph.match(records, subsets, names[0], KINDS, "priority", buckets=3, workers=1)
    any_of = identity_graph.match(records, subsets, names[0], KINDS, "any_of", buckets=2)
    for subset in subsets:
        people = _result(priority.overlaps[subset])
        assert people == _result(again.overlaps[subset])
        wider = _result(any_of.overlaps[subset])
        assert all(any(person <= other for other in wider) for person in people), subset
        by_id: dict[str, list[tuple[str, ...]]] = {}
        for link in priority.overlaps[subset].links:
            by_id.setdefault(link[0], []).append(link)
        for links in by_id.values():
            for party in subset:
                emails = {link[2] for link in links if link[1] == party}
                assert len(emails) == 1, f"{party} has records of two people (by email) in one person: {links}"
    assert any(_result(priority.overlaps[s]) != _result(any_of.overlaps[s]) for s in subsets), "household phones make the rules differ"


def test_one_person_matched_by_email_and_phone_is_one_person() -> None:
    frames = {
        "bank": pd.DataFrame([{"email": "a@x.org", "phone": "+15550000001"}, {"email": "b@x.org", "phone": None}]),
        "telecom": pd.DataFrame([{"email": "a@x.org", "phone": "+15550000001"}, {"email": None, "phone": "+15550000002"}]),
    }
    result = identity_graph.match(_records(frames), [("bank", "telecom")], "bank", KINDS, "any_of")
    overlap = result.overlaps[("bank", "telecom")]
    assert overlap.matched == 1
    assert result.links[("bank", "telecom", "email")] == 1 and result.links[("bank", "telecom", "phone")] == 1


def _bank_records(overlap: identity_graph.Overlap) -> int:
    return len([link for link in overlap.links if link[1] == "bank"])


def test_priority_keeps_a_family_phone_from_merging_two_people_any_of_merges() -> None:
    """Two bank customers share a household phone; the telecom knows one of them by email and the phone."""
    pair = ("bank", "telecom")
    frames = {
        "bank": pd.DataFrame([{"email": "ann@x.org", "phone": "+15550000009"}, {"email": "bob@x.org", "phone": "+15550000009"}]),
        "telecom": pd.DataFrame([{"email": "ann@x.org", "phone": "+15550000009"}, {"email": "carl@x.org", "phone": None}]),
    }
    any_of = identity_graph.match(_records(frames), [pair], "bank", KINDS, "any_of").overlaps[pair]
    priority = identity_graph.match(_records(frames), [pair], "bank", KINDS, "priority").overlaps[pair]
    assert (any_of.matched, _bank_records(any_of)) == (1, 2)  # Ann and Bob are one person to any_of
    assert (priority.matched, _bank_records(priority)) == (1, 1)  # Ann only
    # Bob's record links to the telecom's Ann by the phone alone: any_of takes it into Ann's person, priority does not
    frames["bank"] = pd.DataFrame([{"email": "ann@x.org", "phone": None}, {"email": "bob@x.org", "phone": "+15550000009"}])
    any_of = identity_graph.match(_records(frames), [pair], "bank", KINDS, "any_of").overlaps[pair]
    priority = identity_graph.match(_records(frames), [pair], "bank", KINDS, "priority").overlaps[pair]
    assert (any_of.matched, _bank_records(any_of)) == (1, 2)
    assert (priority.matched, _bank_records(priority)) == (1, 1)


def test_priority_does_not_merge_two_people_through_another_party() -> None:
    """(An outside review's cases.) A: the bank's two customers share a phone and the airline knows each by email.
    B: a phone link refused between the bank and the airline must not be made anyway through the telecom."""
    frames = {
        "airline": pd.DataFrame([{"email": "e1@x.org", "phone": None}, {"email": "e2@x.org", "phone": None}]),
        "bank": pd.DataFrame([{"email": "e1@x.org", "phone": "+15550000001"}, {"email": "e2@x.org", "phone": "+15550000001"}]),
    }
    pair = ("airline", "bank")
    assert identity_graph.match(_records(frames), [pair], "bank", KINDS, "priority").overlaps[pair].matched == 2
    assert identity_graph.match(_records(frames), [pair], "bank", KINDS, "any_of").overlaps[pair].matched == 1
    frames = {
        "bank": pd.DataFrame([{"email": "e1@x.org", "phone": "+15550000001"}, {"email": "e2@x.org", "phone": "+15550000002"}]),
        "telecom": pd.DataFrame([{"email": None, "phone": "+15550000001"}, {"email": None, "phone": "+15550000002"}]),
        "airline": pd.DataFrame([{"email": "e1@x.org", "phone": "+15550000002"}]),
    }
    everyone = ("bank", "telecom", "airline")
    priority = identity_graph.match(_records(frames), [everyone], "telecom", KINDS, "priority").overlaps[everyone]
    assert priority.matched == 1 and _bank_records(priority) == 1
    any_of = identity_graph.match(_records(frames), [everyone], "telecom", KINDS, "any_of").overlaps[everyone]
    assert any_of.matched == 1 and _bank_records(any_of) == 2


def test_two_parties_people_do_not_depend_on_a_third_partys_data() -> None:
    """The bank knows Ann by email, the telecom by phone; only the airline holds both. Bank and telecom alone share nobody."""
    frames = {
        "bank": pd.DataFrame([{"email": "ann@x.org", "phone": None}]),
        "telecom": pd.DataFrame([{"email": None, "phone": "+15550000001"}]),
        "airline": pd.DataFrame([{"email": "ann@x.org", "phone": "+15550000001"}]),
    }
    subsets = [("bank", "telecom", "airline"), ("bank", "telecom")]
    result = identity_graph.match(_records(frames), subsets, "bank", KINDS, "any_of")
    assert result.overlaps[subsets[0]].matched == 1
    assert result.overlaps[subsets[1]].matched == 0
    assert ("telecom", "airline") in identity_graph.pairs_needed(subsets, "bank") or ("airline", "telecom") in identity_graph.pairs_needed(subsets, "bank")


def test_match_ids_are_fresh_and_units_stable() -> None:
    frames = _people(random.Random(9), ["bank", "telecom"], 40)
    first = identity_graph.match(_records(frames), [("bank", "telecom")], "bank", KINDS, "any_of").overlaps[("bank", "telecom")]
    again = identity_graph.match(_records(frames), [("bank", "telecom")], "bank", KINDS, "any_of").overlaps[("bank", "telecom")]
    assert not {r[0] for r in first.rows} & {r[0] for r in again.rows}
    assert sorted(r[1:] for r in first.rows) == sorted(r[1:] for r in again.rows)


def test_the_digest_follows_records_and_settings_not_order() -> None:
    frames = _people(random.Random(10), ["bank", "telecom"], 30)
    records = _records(frames)
    base = identity_graph.digest(records, "bank", KINDS, "any_of", [("bank", "telecom")], 1)
    shuffled = [PartyRecords(r.party, r.kinds, list(reversed(r.records))) for r in reversed(records)]
    assert identity_graph.digest(shuffled, "bank", KINDS, "any_of", [("bank", "telecom")], 1) == base
    assert identity_graph.digest(records, "bank", KINDS, "priority", [("bank", "telecom")], 1) != base
    fewer = [PartyRecords(records[0].party, KINDS, records[0].records[1:]), records[1]]
    assert identity_graph.digest(fewer, "bank", KINDS, "any_of", [("bank", "telecom")], 1) != base
