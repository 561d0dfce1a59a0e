"""Counts and nouns agree in what the command line prints."""

from __future__ import annotations

import pytest

from dcr_pipelines.lib.text import plural


@pytest.mark.parametrize(("count", "noun", "expected"), [
    (0, "query", "0 queries"), (1, "query", "1 query"), (2, "query", "2 queries"),
    (1, "row", "1 row"), (12_345, "row", "12,345 rows"), (1, "file", "1 file"), (3, "dataset", "3 datasets"),
    (1, "policy mistake", "1 policy mistake"), (2, "policy mistake", "2 policy mistakes"), (2, "person", "2 people"),
])
def test_the_noun_agrees_with_the_count(count: int, noun: str, expected: str) -> None:
    assert plural(count, noun) == expected


def test_an_irregular_plural_can_be_given() -> None:
    assert plural(2, "analysis", "analyses") == "2 analyses" and plural(1, "analysis", "analyses") == "1 analysis"
