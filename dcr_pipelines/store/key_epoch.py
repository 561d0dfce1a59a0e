"""A key epoch's keys and kept blinded values, in the operator's matching schema (see ``lib/psi_epoch.py``).

``psi_epoch`` holds each party's key of the current epoch, ``psi_epoch_values`` the doubly blinded value of each
(owner, peer, token). Every function here runs inside the caller's transaction on an operator connection: a
match's new values, removals and the cross-reference they give are committed together or not at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import sql

from ..lib import naming
from . import migrations

FETCH_ROWS = 50_000
_cursors = itertools.count().__next__  # names of server-side cursors, unique in the process


def _tables(collab: str) -> tuple[sql.Identifier, sql.Identifier]:
    schema = naming.matching_schema(collab)
    return sql.Identifier(schema, "psi_epoch"), sql.Identifier(schema, "psi_epoch_values")


def current_keys(conn: psycopg.Connection, collab: str, config: str, length_seconds: int) -> dict[str, bytes] | None:
    """The keys of the epoch running for ``config`` and younger than ``length_seconds``; otherwise the epoch is
    ended (keys and values deleted) and None is returned."""
    migrations.ensure(conn, "matching", naming.matching_schema(collab))
    epoch, _ = _tables(collab)
    rows = conn.execute(sql.SQL("select party, psi_key, config, extract(epoch from now() - started_at) from {}").format(epoch)).fetchall()
    if rows and all(r[2] == config and float(r[3]) < length_seconds for r in rows):
        return {str(r[0]): bytes(r[1]) for r in rows}
    end(conn, collab)
    return None


def start(conn: psycopg.Connection, collab: str, config: str, keys: dict[str, bytes]) -> None:
    """A new epoch: the old one's keys and values deleted, ``keys`` kept."""
    epoch, values = _tables(collab)
    conn.execute(sql.SQL("delete from {}").format(values))
    conn.execute(sql.SQL("delete from {}").format(epoch))
    with conn.cursor().copy(sql.SQL("copy {} (party, psi_key, config) from stdin").format(epoch)) as copy:
        for party, key in sorted(keys.items()):
            copy.write_row((party, key, config))


def expire(conn: psycopg.Connection, collab: str, length_seconds: int) -> bool:
    """End the epoch if epochs are off (``length_seconds`` 0) or its time is up; whether one ended."""
    migrations.ensure(conn, "matching", naming.matching_schema(collab))
    epoch, _ = _tables(collab)
    row = conn.execute(sql.SQL("select count(*), coalesce(max(extract(epoch from now() - started_at)), 0) from {}").format(epoch)).fetchone()
    if row is None or int(row[0]) == 0 or (length_seconds and float(row[1]) < length_seconds):
        return False
    end(conn, collab)
    return True


def end(conn: psycopg.Connection, collab: str) -> None:
    """Delete the epoch's keys and blinded values."""
    epoch, values = _tables(collab)
    with conn.transaction():
        conn.execute(sql.SQL("delete from {}").format(values))
        conn.execute(sql.SQL("delete from {}").format(epoch))


@contextmanager
def kept_tokens(conn: psycopg.Connection, collab: str, owner: str, peer: str) -> Iterator[Iterator[str]]:
    """The tokens of ``owner`` with a kept value for ``peer``, ascending byte-wise, streamed (as of the call:
    values added later in the transaction are not among them)."""
    _, values = _tables(collab)
    with conn.cursor(name=f"dcr_epoch_kept_{_cursors()}") as cur:  # not the party names: a name over 63 bytes is cut
        cur.itersize = FETCH_ROWS
        cur.execute(sql.SQL("select token from {} where owner = %s and peer = %s order by token").format(values), (owner, peer))
        yield (str(row[0]) for row in cur)


def add(conn: psycopg.Connection, collab: str, rows: Iterable[tuple[str, str, str, bytes]]) -> int:
    """Keep new (owner, peer, token, value) rows; the bytes of the values written."""
    _, values = _tables(collab)
    written = 0
    with conn.cursor().copy(sql.SQL("copy {} (owner, peer, token, value) from stdin").format(values)) as copy:
        for row in rows:
            copy.write_row(row)
            written += len(row[3])
    return written


class Removals:
    """Kept values to delete, gathered in a temporary table while the kept tokens are still being read."""

    def __init__(self, conn: psycopg.Connection, collab: str) -> None:
        self._conn, self._collab, self.count = conn, collab, 0
        conn.execute("create temporary table if not exists dcr_epoch_gone (owner text, peer text, token text collate \"C\") on commit drop")

    def add(self, rows: Sequence[tuple[str, str, str]]) -> None:
        with self._conn.cursor().copy("copy dcr_epoch_gone (owner, peer, token) from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        self.count += len(rows)

    def apply(self) -> None:
        _, values = _tables(self._collab)
        if self.count:
            self._conn.execute(sql.SQL("delete from {} v using dcr_epoch_gone g where v.owner = g.owner and v.peer = g.peer "
                                       "and v.token = g.token").format(values))
        self._conn.execute("drop table dcr_epoch_gone")


def analyze(conn: psycopg.Connection, collab: str, *tables: sql.Identifier) -> None:
    """Fresh planner statistics for the kept values (and ``tables``) after a match changed them in this transaction:
    without them the join below is planned as a nested loop, quadratic in the identities."""
    for table in (_tables(collab)[1], *tables):
        conn.execute(sql.SQL("analyze {}").format(table))


@contextmanager
def matches(conn: psycopg.Connection, collab: str, client: str, servers: Sequence[str]) -> Iterator[Iterator[tuple[str, ...]]]:
    """(client token, each server's token) of every identity the client shares with every server: the client's
    value for a server equals that server's value for the client. Streamed; the database joins."""
    _, values = _tables(collab)
    joins, params = [], []
    for i, server in enumerate(servers):
        c_alias, s_alias = sql.Identifier(f"c{i}"), sql.Identifier(f"s{i}")
        if i:
            joins.append(sql.SQL("join {} {c} on {c}.token = c0.token and {c}.owner = %s and {c}.peer = %s").format(values, c=c_alias))
            params += [client, server]
        joins.append(sql.SQL("join {} {s} on {s}.value = {c}.value and {s}.owner = %s and {s}.peer = %s").format(values, s=s_alias, c=c_alias))
        params += [server, client]
    columns = sql.SQL(", ").join([sql.SQL("c0.token"), *(sql.SQL("{}.token").format(sql.Identifier(f"s{i}")) for i in range(len(servers)))])
    query = sql.SQL("select {} from {} c0 {} where c0.owner = %s and c0.peer = %s").format(columns, values, sql.SQL(" ").join(joins))
    params += [client, servers[0]]
    with conn.cursor(name="dcr_epoch_matches") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query, params)
        yield (tuple(str(t) for t in row) for row in cur)


@contextmanager
def unmatched(conn: psycopg.Connection, collab: str, owner: str, peer: str, table: sql.Identifier, column: str) -> Iterator[Iterator[str]]:
    """The owner's kept tokens (for ``peer``) that are in no row of ``table.column``: the identities padding stands for."""
    _, values = _tables(collab)
    with conn.cursor(name=f"dcr_epoch_unmatched_{_cursors()}") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(sql.SQL("select v.token from {} v where v.owner = %s and v.peer = %s and not exists "
                            "(select 1 from {} x where x.{} = v.token collate \"C\")").format(values, table, sql.Identifier(column)), (owner, peer))
        yield (str(row[0]) for row in cur)
