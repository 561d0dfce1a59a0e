"""Wording shared by the command line: counts with their nouns in agreement."""

from __future__ import annotations

IRREGULAR = {"query": "queries", "entry": "entries", "party": "parties", "person": "people"}


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun`` in agreement: ``plural(1, "query")`` is "1 query", ``plural(2, "query")`` "2 queries".

    The count gets thousands separators; ``many`` gives the plural of a noun that takes neither ``s`` nor an entry
    of :data:`IRREGULAR`.
    """
    return f"{count:,} {noun if count == 1 else (many or IRREGULAR.get(noun) or noun + 's')}"
