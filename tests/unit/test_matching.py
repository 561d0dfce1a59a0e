"""PSI matching equals the plain intersection, for any bucket count, with random match ids."""

from __future__ import annotations

import hashlib
import random
from types import SimpleNamespace

import pytest

from dcr_pipelines.lib.matching import PartyInput, match


def _party(name: str, identifiers: list[str]) -> PartyInput:
    distinct = sorted(set(identifiers))
    tokens = [hashlib.sha256(f"{name}:{i}".encode()).hexdigest() for i in distinct]
    return PartyInput(name, tokens, distinct)


def _matched_identifiers(result, inputs: list[PartyInput]) -> set[str]:  # type: ignore[no-untyped-def]
    by_token = {t: i for inp in inputs for t, i in zip(inp.tokens, inp.identifiers, strict=False)}
    matched = set()
    for row in result.rows:
        identifiers = {by_token[token] for token in row[1:]}
        assert len(identifiers) == 1, "a row links tokens of different people"
        matched |= identifiers
    return matched


def _planted(n: int, overlap: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    shared = [f"shared{i}@example.com" for i in range(overlap)]
    a = shared + [f"a{i}@example.com" for i in range(n - overlap)]
    b = shared + [f"b{i}@example.org" for i in range(n - overlap)]
    rng.shuffle(a)
    rng.shuffle(b)
    return a, b


@pytest.mark.parametrize("buckets", [1, 2, 7])
def test_matches_equal_the_plain_intersection_for_any_bucket_count(buckets: int) -> None:
    a, b = _planted(400, 130, seed=buckets)
    inputs = [_party("retailer", a), _party("ad_network", b)]
    result = match(inputs, "ad_network", buckets=buckets)
    assert _matched_identifiers(result, inputs) == set(a) & set(b)
    assert result.matched == 130
    assert result.parties == ("ad_network", "retailer")


def test_duplicates_non_ascii_and_a_single_element() -> None:
    a = ["zoë@example.com", "zoë@example.com", "李@example.cn", "only-a@example.com"]
    b = ["李@example.cn", "zoë@example.com", "only-b@example.com"]
    inputs = [_party("a", a), _party("b", b)]
    assert _matched_identifiers(match(inputs, "a"), inputs) == {"zoë@example.com", "李@example.cn"}
    single = [_party("a", ["x@example.com"]), _party("b", ["x@example.com"])]
    assert match(single, "b").matched == 1


def test_empty_inputs_match_nothing() -> None:
    assert match([_party("a", []), _party("b", ["x@example.com"])], "a").matched == 0
    assert match([_party("a", ["x@example.com"]), _party("b", [])], "a").matched == 0


def test_three_parties_intersect_across_all() -> None:
    a = ["p1", "p2", "p3", "p4"]
    b = ["p2", "p3", "p4", "p5"]
    c = ["p3", "p4", "p6"]
    inputs = [_party("a", a), _party("b", b), _party("c", c)]
    result = match(inputs, "b", buckets=2)
    assert _matched_identifiers(result, inputs) == {"p3", "p4"}
    assert len(result.rows[0]) == 4  # match_id + one token per party


def test_match_ids_are_random_not_derived_from_identifiers() -> None:
    inputs = [_party("a", ["p1", "p2"]), _party("b", ["p1", "p2"])]
    first = {row[1]: row[0] for row in match(inputs, "a").rows}
    second = {row[1]: row[0] for row in match(inputs, "a").rows}
    assert first.keys() == second.keys()
    assert all(first[t] != second[t] for t in first)


def test_parallel_workers_give_the_same_matches_as_one_process() -> None:
    a, b = _planted(300, 90, seed=11)
    inputs = [_party("retailer", a), _party("ad_network", b)]
    one = {row[1:] for row in match(inputs, "retailer", buckets=4, workers=1).rows}
    two = {row[1:] for row in match(inputs, "retailer", buckets=4, workers=2).rows}
    assert one == two and len(one) == 90


def test_the_input_digest_changes_with_the_inputs_and_not_with_their_order() -> None:
    from dcr_pipelines.lib.matching import input_digest

    a, b = _party("a", ["x@e.com", "y@e.com"]), _party("b", ["y@e.com"])
    reordered = PartyInput("a", list(reversed(a.tokens)), list(reversed(a.identifiers)))
    assert input_digest([a, b], "a", 2) == input_digest([b, reordered], "a", 2)
    assert input_digest([a, b], "a", 2) != input_digest([a, _party("b", ["z@e.com"])], "a", 2)
    assert input_digest([a, b], "a", 2) != input_digest([a, b], "a", 3)
    assert input_digest([a, b], "a", 2) != input_digest([a, b], "b", 2)
    assert input_digest([a, b], "a", 2) != input_digest([a, b], "a", 2, padding=True), "turning padding on must rebuild the table"


def test_padding_hides_the_overlap_size_with_rows_that_join_nothing() -> None:
    a, b = _planted(200, 60, seed=5)
    inputs = [_party("retailer", a), _party("ad_network", b)]
    result = match(inputs, "retailer", buckets=2, padding=True)
    assert result.matched == 60
    assert len(result.rows) == 200 + 200 - 60, "one row per distinct identity across the parties"
    real = {t for inp in inputs for t in inp.tokens}
    for column in (1, 2):
        tokens = [row[column] for row in result.rows]
        assert len(set(tokens)) == len(tokens)
        assert real >= {t for t in tokens if t in real} and sum(t in real for t in tokens) == 200
        assert all(len(t) == 64 for t in tokens), "forged tokens look like real ones"
    assert sum(row[1] in real and row[2] in real for row in result.rows) == 60


def _bucketed(inputs: list[PartyInput], buckets: int) -> list[tuple[int, list[PartyInput]]]:
    from dcr_pipelines.lib.matching import split

    return list(enumerate(split(inputs, buckets)))


@pytest.mark.parametrize("trial", range(6))
def test_matching_bucket_by_bucket_equals_the_plain_intersection_on_random_inputs(trial: int) -> None:
    """Random party counts, sizes, overlaps, bucket counts (empty buckets and empty parties included), padding on and off."""
    from dcr_pipelines.lib.matching import match_buckets

    rng = random.Random(100 + trial)
    people = [f"p{i}@example.com" for i in range(rng.randint(0, 120))] + ["zoë@exämple.de", "李@example.cn"]
    parties = ["client", *(f"s{k}" for k in range(rng.randint(1, 2)))]
    held = {p: rng.sample(people, rng.randint(0, len(people))) for p in parties}
    inputs = [_party(p, held[p]) for p in parties]
    buckets, padding = rng.choice([1, 3, 8, 40]), rng.random() < 0.5
    parts = list(match_buckets(_bucketed(inputs, buckets), parties, lanes=rng.randint(1, 2), padding=padding))
    assert sorted(part.bucket for part in parts) == list(range(buckets))
    rows = [row for part in parts for row in part.rows]

    real = {t for inp in inputs for t in inp.tokens}
    result = SimpleNamespace(rows=[row for row in rows if all(t in real for t in row[1:])])  # padding rows hold forged tokens
    shared = set.intersection(*(set(held[p]) for p in parties))
    assert _matched_identifiers(result, inputs) == shared
    assert sum(part.matched for part in parts) == len(shared)
    assert len({row[0] for row in rows}) == len(rows), "match_ids are unique across buckets"
    if padding:  # every real token appears exactly once in its party's column, as when the whole is padded at once
        for column, inp in enumerate(inputs, start=1):
            real = [row[column] for row in rows if row[column] in set(inp.tokens)]
            assert sorted(real) == sorted(inp.tokens)
    else:
        assert len(rows) == len(shared)


def test_psi_jobs_reads_its_jobs_only_as_lanes_free_up() -> None:
    """The streamed match holds at most one bucket per lane: the job iterator is never read further ahead."""
    from dcr_pipelines.lib.matching import psi_jobs

    pulled, ahead = 0, 0
    lanes = 2

    def jobs():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for b in range(9):
            pulled += 1
            yield b, [f"x{b}-{i}" for i in range(30)], [[f"x{b}-{i}" for i in range(0, 30, 3)]]

    seen = []
    for yielded, (tag, found, _) in enumerate(psi_jobs(jobs(), servers=1, lanes=lanes), start=1):
        ahead = max(ahead, pulled - yielded)
        seen.append((tag, len(found)))
    assert sorted(seen) == [(b, 10) for b in range(9)]
    assert ahead <= lanes, f"read {ahead} jobs ahead of the lanes"


def test_the_streamed_digest_equals_the_digest_of_inputs_in_memory_and_wants_parties_in_order() -> None:
    from dcr_pipelines.lib.matching import InputDigest, input_digest

    a, b = _party("a", ["x@e.com", "zoë@e.com", "y@e.com"]), _party("b", ["李@e.cn"])
    streamed = InputDigest("a", 2)
    for inp in (a, b):
        streamed.party(inp.party, sorted(zip(inp.tokens, inp.identifiers, strict=True)))
    assert streamed.hexdigest() == input_digest([b, a], "a", 2)
    backwards = InputDigest("a", 2)
    backwards.party("b", [])
    with pytest.raises(ValueError, match="name order"):
        backwards.party("a", [])


@pytest.mark.parametrize(("configured", "largest", "expected"), [(1, 0, 1), (2, 10, 2), (1, 250_000, 1), (1, 250_001, 2), (4, 10_000_000, 40), (64, 10_000_000, 64)])
def test_work_buckets_keep_each_bucket_near_the_target_size(configured: int, largest: int, expected: int) -> None:
    from dcr_pipelines.lib.matching import work_buckets

    assert work_buckets(configured, largest) == expected
