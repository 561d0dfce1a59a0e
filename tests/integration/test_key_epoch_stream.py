"""Matching inside a key epoch, streamed through a real PostgreSQL and real openmined-psi blinding.

After any random sequence of edits the cross-reference holds exactly the people every party shares, each row
linking one person's tokens, while only identities new since the last match are blinded and the kept values
follow the parties' current identities. Batches are made tiny so that every boundary is crossed. A run that
fails half-way leaves the previous epoch state and cross-reference as they were.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.lib import naming, psi_epoch
from dcr_pipelines.services import key_epoch
from dcr_pipelines.store import migrations

COLLAB = "epoch_stream"
# names as long as the policy allows (40 characters): nothing derived from them may pass PostgreSQL's 63-byte limit
CLIENT, S1, S2 = "client_" + "c" * 33, "server_one_" + "s" * 29, "server_two_" + "t" * 29
PARTIES = (CLIENT, S1, S2)


def _token(party: str, identifier: str) -> str:
    return hashlib.sha256(f"{party}:{identifier}".encode()).hexdigest()


def _owned(sets: dict[str, set[str]], fail_after: int | None = None) -> Any:
    @contextmanager
    def owned(party: str) -> Iterator[Iterator[tuple[str, str]]]:
        rows = sorted((_token(party, i), i) for i in sets[party])

        def stream() -> Iterator[tuple[str, str]]:
            for n, row in enumerate(rows):
                if fail_after is not None and n == fail_after:
                    raise RuntimeError("killed")
                yield row
        yield stream()
    return owned


def _match(url: str, sets: dict[str, set[str]], *, padding: bool = False, fail_after: int | None = None, workers: int = 1) -> key_epoch.EpochMatch:
    with psycopg.connect(url) as conn:
        return key_epoch.match(conn, COLLAB, CLIENT, [S1, S2], _owned(sets, fail_after), seconds=3600, padding=padding,
                               digest="d", workers=workers)


def _rows(url: str) -> list[tuple[str, ...]]:
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in ["match_id", *(naming.party_token_column(p) for p in PARTIES)])
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql.SQL("select {} from {}").format(columns, sql.Identifier(naming.matching_schema(COLLAB), "cross_reference")))]


def _people(url: str, sets: dict[str, set[str]]) -> set[str]:
    by_token = {_token(p, i): i for p, ids in sets.items() for i in ids}
    out = set()
    for row in _rows(url):
        people = {by_token[t] for t in row[1:]}
        assert len(people) == 1, "a row links tokens of different people"
        out.add(people.pop())
    return out


def _kept(url: str) -> dict[tuple[str, str], set[str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(sql.SQL("select owner, peer, token from {}").format(sql.Identifier(naming.matching_schema(COLLAB), "psi_epoch_values")))
        out: dict[tuple[str, str], set[str]] = {}
        for owner, peer, token in rows:
            out.setdefault((owner, peer), set()).add(token)
    return out


@pytest.fixture()
def url(runtime, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(psi_epoch, "BATCH", 7)  # every batch boundary crossed on small sets
    url = str(runtime.warehouse.url())
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.ensure(conn, "meta")
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(naming.matching_schema(COLLAB))))
        conn.execute("delete from dcr_meta.schema_migrations where scope like %s", (f"%{naming.matching_schema(COLLAB)}%",))
    return url


def test_random_edit_sequences_match_the_plain_intersection_and_blind_only_what_is_new(url: str) -> None:
    rng = random.Random(20)
    universe = [f"p{i}@example.com" for i in range(300)]
    sets = {p: set(rng.sample(universe, 90)) for p in PARTIES}
    before: dict[str, set[str]] = {p: set() for p in PARTIES}
    for step in range(6):
        done = _match(url, sets)
        plain = set.intersection(*sets.values())
        assert _people(url, sets) == plain and done.matched == len(plain) == len(_rows(url))
        assert done.started is (step == 0)
        assert done.blinded == sum(len(sets[p] - before[p]) for p in PARTIES), "only new identities are blinded"
        gone = {p: len(before[p] - sets[p]) for p in PARTIES}
        assert done.removed == 2 * gone[CLIENT] + gone[S1] + gone[S2]  # the client's values are kept per server
        current = {p: {_token(p, i) for i in sets[p]} for p in PARTIES}
        assert _kept(url) == {(CLIENT, S1): current[CLIENT], (CLIENT, S2): current[CLIENT], (S1, CLIENT): current[S1], (S2, CLIENT): current[S2]}
        before = {p: set(sets[p]) for p in PARTIES}
        for p in PARTIES:  # an edit: a few identities gone and new per party (sometimes none)
            drop = set(rng.sample(sorted(sets[p]), rng.randint(0, 9)))
            sets[p] = (sets[p] - drop) | (set(rng.sample(universe, rng.randint(0, 12))) - sets[p])


def test_a_run_that_fails_half_way_keeps_the_previous_state(url: str) -> None:
    rng = random.Random(5)
    universe = [f"k{i}@example.com" for i in range(200)]
    sets = {p: set(rng.sample(universe, 80)) for p in PARTIES}
    _match(url, sets)
    rows, kept = _rows(url), _kept(url)
    changed = {p: (ids - set(rng.sample(sorted(ids), 10))) | set(rng.sample(universe, 20)) for p, ids in sets.items()}
    for fail_after in (0, 3, 40, 75):
        with pytest.raises(RuntimeError, match="killed"):
            _match(url, changed, fail_after=fail_after)
        assert _rows(url) == rows and _kept(url) == kept
    done = _match(url, changed)
    assert not done.started and _people(url, changed) == set.intersection(*changed.values())


def test_padding_adds_one_row_per_unmatched_identity_in_match_id_order(url: str) -> None:
    rng = random.Random(9)
    universe = [f"q{i}@example.com" for i in range(120)]
    sets = {p: set(rng.sample(universe, 50)) for p in PARTIES}
    done = _match(url, sets, padding=True)
    shared = set.intersection(*sets.values())
    rows = _rows(url)
    assert done.matched == len(shared) and done.rows == len(rows) == len(shared) + sum(len(s - shared) for s in sets.values())
    real = {_token(p, i) for p, ids in sets.items() for i in ids}
    assert all(sum(t in real for t in row[1:]) in (1, len(PARTIES)) for row in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows), "stored in match_id order: padding is not told apart by its place"


def test_values_differ_across_epochs_and_a_large_change_uses_worker_processes(url: str) -> None:
    rng = random.Random(3)
    universe = [f"w{i}@example.com" for i in range(5000)]
    sets = {p: set(rng.sample(universe, 2200)) for p in PARTIES}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(psi_epoch, "BATCH", 100_000)
        done = _match(url, sets, workers=2)
    assert done.blinded == 6600 and done.multiplications == 6600 + 4 * 2200
    assert _people(url, sets) == set.intersection(*sets.values())
    with psycopg.connect(url) as conn:
        values = sql.Identifier(naming.matching_schema(COLLAB), "psi_epoch_values")
        first = {bytes(r[0]) for r in conn.execute(sql.SQL("select value from {}").format(values))}
        conn.execute(sql.SQL("update {} set started_at = now() - interval '2 hours'").format(sql.Identifier(naming.matching_schema(COLLAB), "psi_epoch")))
    assert _match(url, sets).started  # the epoch's time is up: new keys
    with psycopg.connect(url) as conn:
        second = {bytes(r[0]) for r in conn.execute(sql.SQL("select value from {}").format(values))}
    assert first.isdisjoint(second), "a blinded value means nothing outside its epoch"
