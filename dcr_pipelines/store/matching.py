"""The matching schema: each party's identities as its own role, bucket steps' pairs, the cross-reference and its build history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import psycopg
from psycopg import sql

from ..lib import matching, naming, psi_epoch
from ..lib.policy import LoadedCollaboration
from ..store import access
from . import migrations


def read_identities(url: str, loaded: LoadedCollaboration, parties: Sequence[str], bucket: int | None = None) -> list[matching.PartyInput]:
    """Each party's (token, identifier) pairs, read as that party's own role; only one bucket's if ``bucket`` is given."""
    c, buckets = loaded.name, loaded.collaboration.matching.buckets
    where = sql.SQL("where {} = %s").format(sql.SQL(matching.bucket_sql('"identifier"', buckets))) if bucket is not None else sql.SQL("")
    inputs = []
    for party in parties:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(access.role_name(c, party, "staging_loader"))))
            rows = conn.execute(
                sql.SQL("select token, identifier from {} {} order by token").format(sql.Identifier(naming.raw_schema(c, party), "identities"), where),
                (bucket,) if bucket is not None else None,
            ).fetchall()
        inputs.append(matching.PartyInput(party, [r[0] for r in rows], [r[1] for r in rows]))
    return inputs


def previous_match(conn: psycopg.Connection, collab: str) -> tuple[str, int, datetime] | None:
    """(input digest, matched count, built at) of the current cross-reference, if one exists."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    row = conn.execute(
        sql.SQL("select input_digest, matched, built_at from {} order by built_at desc limit 1").format(sql.Identifier(schema, "cross_reference_builds"))
    ).fetchone()
    return (str(row[0]), int(row[1]), row[2]) if row else None


def write_cross_reference(conn: psycopg.Connection, collab: str, result: matching.MatchResult, digest: str, client: str) -> None:
    """Swap in a new cross-reference (one random match_id, each party's token, the client's unit) and record its build."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    columns = ["match_id", *(naming.party_token_column(p) for p in result.parties)]
    new = sql.Identifier(schema, "cross_reference__new")
    at = 1 + result.parties.index(client)
    with conn.transaction():
        conn.execute(sql.SQL("drop table if exists {}").format(new))
        conn.execute(sql.SQL("create table {} ({}, unit bigint not null)").format(
            new, sql.SQL(", ").join(sql.SQL("{} text not null").format(sql.Identifier(col)) for col in columns)))
        with conn.cursor().copy(sql.SQL("copy {} ({}, unit) from stdin").format(new, sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
            for row in result.rows:
                copy.write_row((*row, matching.unit_of(row[at])))
        conn.execute(sql.SQL("drop table if exists {} cascade").format(sql.Identifier(schema, "cross_reference")))
        conn.execute(sql.SQL("alter table {} rename to cross_reference").format(new))
        conn.execute(sql.SQL("alter table {} add primary key (match_id)").format(sql.Identifier(schema, "cross_reference")))
        conn.execute(sql.SQL("insert into {} (input_digest, matched) values (%s, %s)").format(sql.Identifier(schema, "cross_reference_builds")),
                     (digest, result.matched))


def _pairs_table(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str]) -> tuple[sql.Identifier, sql.Identifier]:
    """The bucket steps' pair table (its columns follow the parties) and their build table; created under a lock, steps run at once."""
    schema = naming.matching_schema(loaded.name)
    migrations.ensure(conn, "matching", schema)
    pairs = sql.Identifier(schema, "bucket_pairs")
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-buckets:{loaded.name}",))
        conn.execute(sql.SQL("create table if not exists {} (bucket int not null, {})").format(
            pairs, sql.SQL(", ").join(sql.SQL("{} text not null").format(sql.Identifier(col)) for col in columns)))
    return pairs, sql.Identifier(schema, "bucket_builds")


def bucket_build(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str], bucket: int) -> tuple[str, int] | None:
    """(input digest, matched) of a bucket's last build."""
    _, builds = _pairs_table(conn, loaded, columns)
    row = conn.execute(sql.SQL("select input_digest, matched from {} where bucket = %s").format(builds), (bucket,)).fetchone()
    return (str(row[0]), int(row[1])) if row else None


def write_bucket(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str], bucket: int,
                 pairs: Sequence[Sequence[str]], digest: str, exchanged: int) -> None:
    """Replace one bucket's pairs and record what they were matched from."""
    pairs_table, builds = _pairs_table(conn, loaded, columns)
    with conn.transaction():
        conn.execute(sql.SQL("delete from {} where bucket = %s").format(pairs_table), (bucket,))
        with conn.cursor().copy(sql.SQL("copy {} (bucket, {}) from stdin").format(pairs_table, sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
            for pair in pairs:
                copy.write_row((bucket, *pair))
        conn.execute(
            sql.SQL("insert into {} (bucket, input_digest, matched, bytes_exchanged) values (%s, %s, %s, %s) on conflict (bucket) do update "
                    "set input_digest = excluded.input_digest, matched = excluded.matched, bytes_exchanged = excluded.bytes_exchanged, built_at = now()").format(builds),
            (bucket, digest, len(pairs), exchanged),
        )


def bucket_digests(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str]) -> dict[int, str]:
    _, builds = _pairs_table(conn, loaded, columns)
    return {int(b): str(d) for b, d in conn.execute(sql.SQL("select bucket, input_digest from {}").format(builds)).fetchall()}


def bucket_pairs(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str]) -> tuple[list[tuple[str, ...]], int]:
    """Every bucket's pairs (bucket order) and the bytes their PSI exchanged."""
    pairs_table, builds = _pairs_table(conn, loaded, columns)
    pairs = conn.execute(sql.SQL("select {} from {} order by bucket").format(sql.SQL(", ").join(map(sql.Identifier, columns)), pairs_table)).fetchall()
    row = conn.execute(sql.SQL("select coalesce(sum(bytes_exchanged), 0) from {}").format(builds)).fetchone()
    return [tuple(p) for p in pairs], int(row[0]) if row else 0


def load_epoch(conn: psycopg.Connection, collab: str, config: str, length_seconds: int) -> psi_epoch.EpochState | None:
    """The current key epoch, if one is running for this configuration and younger than ``length_seconds``;
    otherwise its keys and values are deleted (the epoch ended) and None is returned."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    epoch, values = sql.Identifier(schema, "psi_epoch"), sql.Identifier(schema, "psi_epoch_values")
    rows = conn.execute(sql.SQL("select party, psi_key, config, extract(epoch from now() - started_at) from {}").format(epoch)).fetchall()
    if rows and all(r[2] == config and float(r[3]) < length_seconds for r in rows):
        state = psi_epoch.EpochState(config, {str(r[0]): bytes(r[1]) for r in rows})
        for owner, peer, token, value in conn.execute(sql.SQL("select owner, peer, token, value from {}").format(values)):
            state.doubles.setdefault((owner, peer), {})[token] = bytes(value)
        return state
    end_epoch(conn, collab)
    return None


def expire_epoch(conn: psycopg.Connection, collab: str, length_seconds: int) -> bool:
    """End the key epoch (delete its keys and values) if epochs are off (``length_seconds`` 0) or its time is up."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    row = conn.execute(sql.SQL("select count(*), coalesce(max(extract(epoch from now() - started_at)), 0) from {}").format(
        sql.Identifier(schema, "psi_epoch"))).fetchone()
    if row is None or int(row[0]) == 0 or (length_seconds and float(row[1]) < length_seconds):
        return False
    end_epoch(conn, collab)
    return True


def end_epoch(conn: psycopg.Connection, collab: str) -> None:
    """Delete the epoch's keys and blinded values (a new epoch, or key_epoch: run)."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    with conn.transaction():
        conn.execute(sql.SQL("delete from {}").format(sql.Identifier(schema, "psi_epoch_values")))
        conn.execute(sql.SQL("delete from {}").format(sql.Identifier(schema, "psi_epoch")))


def save_epoch(conn: psycopg.Connection, collab: str, state: psi_epoch.EpochState, change: psi_epoch.EpochChange, new: bool) -> None:
    """Persist one match's change to the epoch (its keys too when the epoch is new), in one transaction."""
    schema = naming.matching_schema(collab)
    epoch, values = sql.Identifier(schema, "psi_epoch"), sql.Identifier(schema, "psi_epoch_values")
    with conn.transaction():
        if new:
            conn.execute(sql.SQL("delete from {}").format(values))
            conn.execute(sql.SQL("delete from {}").format(epoch))
            with conn.cursor().copy(sql.SQL("copy {} (party, psi_key, config) from stdin").format(epoch)) as copy:
                for party, key in sorted(state.keys.items()):
                    copy.write_row((party, key, state.config))
        if change.removed:
            owners = sorted({o for o, _ in change.removed})
            for owner in owners:
                conn.execute(sql.SQL("delete from {} where owner = %s and token = any(%s)").format(values),
                             (owner, [t for o, t in change.removed if o == owner]))
        with conn.cursor().copy(sql.SQL("copy {} (owner, peer, token, value) from stdin").format(values)) as copy:
            for row in change.added:
                copy.write_row(row)
