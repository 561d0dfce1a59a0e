"""The matching schema: each party's identities as its own role, bucket steps' pairs, the cross-reference and its build history."""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..lib import identity_graph, matching, naming
from ..lib.policy import LoadedCollaboration
from ..store import access
from . import migrations


def read_identities(url: str, loaded: LoadedCollaboration, parties: Sequence[str], bucket: int | None = None) -> list[matching.PartyInput]:
    """Each party's (token, identifier) pairs, read as that party's own role; only one bucket's if ``bucket`` is given."""
    c = loaded.name
    # Bucket steps: the identity list holds each pair's bucket, indexed (dbt_codegen.identities_sql)
    where = sql.SQL("where bucket = %s") if bucket is not None else sql.SQL("")
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


FETCH_ROWS = 50_000  # rows per round trip of a streaming read


class IdentitySnapshot:
    """Every party's identities as they stood when the snapshot began, each read as that party's own role.

    One repeatable-read transaction per party, so the digest and the buckets read from it describe the same rows
    (a staging run that rebuilds an identity list meanwhile waits for the snapshot to end). Rows are streamed
    through server-side cursors: no process holds every identity.
    """

    def __init__(self, url: str, loaded: LoadedCollaboration, parties: Sequence[str], stack: ExitStack) -> None:
        self._loaded, self.parties = loaded, list(parties)
        self._conns = {}
        for party in self.parties:
            conn = stack.enter_context(psycopg.connect(url))
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute("set local work_mem = '64MB'")  # the sorts behind the ordered reads
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(access.role_name(loaded.name, party, "staging_loader"))))
            self._conns[party] = conn

    def _table(self, party: str) -> sql.Identifier:
        return sql.Identifier(naming.raw_schema(self._loaded.name, party), "identities")

    @contextmanager
    def _rows(self, party: str, query: sql.Composed) -> Iterator[psycopg.ServerCursor[Any]]:
        with self._conns[party].cursor(name=f"dcr_identities_{party}") as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(query)
            yield cur

    def digest(self, client: str) -> tuple[str, dict[str, int]]:
        """``matching.input_digest`` of the identities and each party's count, sorted by the server in code-point
        order (``collate "C"``), the order ``input_digest`` sorts in."""
        spec = self._loaded.collaboration.matching
        digest = matching.InputDigest(client, spec.buckets, padding=spec.padding)
        counts = {}
        for party in sorted(self.parties):
            query = sql.SQL('select token, identifier from {} order by token collate "C", identifier collate "C"').format(self._table(party))
            with self._rows(party, query) as cur:
                counts[party] = digest.party(party, cur)
        return digest.hexdigest(), counts

    @contextmanager
    def ordered(self, party: str) -> Iterator[Iterator[tuple[str, str]]]:
        """The party's (token, identifier) pairs, ascending byte-wise by token, streamed."""
        with self._rows(party, sql.SQL('select token, identifier from {} order by token collate "C"').format(self._table(party))) as cur:
            yield ((str(r[0]), str(r[1])) for r in cur)

    def inputs(self) -> list[matching.PartyInput]:
        """Every party's identities at once (a key epoch and parties at home need them so), in ``parties`` order."""
        out = []
        for party in self.parties:
            with self._rows(party, sql.SQL("select token, identifier from {} order by token").format(self._table(party))) as cur:
                rows = cur.fetchall()
            out.append(matching.PartyInput(party, [r[0] for r in rows], [r[1] for r in rows]))
        return out

    def buckets(self, buckets: int) -> Generator[tuple[int, list[matching.PartyInput]]]:
        """The identities cut into ``buckets`` hash buckets, one bucket at a time in bucket order, every party's input
        in ``parties`` order (empty where a party has none in that bucket); read as the consumer asks for the next."""
        spec = self._loaded.collaboration.matching
        # with bucket steps the identity list holds each pair's bucket of the policy's count; otherwise it is computed
        bucket_of = sql.SQL("bucket") if spec.bucket_steps and buckets == spec.buckets else sql.SQL(matching.bucket_sql('"identifier"', buckets))
        with ExitStack() as stack:
            streams = []
            for party in self.parties:
                query = sql.SQL("select b, token, identifier from (select {} as b, token, identifier from {}) s order by b").format(
                    bucket_of, self._table(party))
                streams.append(itertools.groupby(stack.enter_context(self._rows(party, query)), key=lambda row: int(row[0])))
            heads = [next(stream, None) for stream in streams]
            for bucket in range(buckets):
                part = []
                for i, party in enumerate(self.parties):
                    tokens: list[str] = []
                    identifiers: list[str] = []
                    head = heads[i]
                    if head is not None and head[0] == bucket:
                        for _, token, identifier in head[1]:
                            tokens.append(token)
                            identifiers.append(identifier)
                        heads[i] = next(streams[i], None)
                    part.append(matching.PartyInput(party, tokens, identifiers))
                yield bucket, part


@contextmanager
def identity_snapshot(url: str, loaded: LoadedCollaboration, parties: Sequence[str]) -> Iterator[IdentitySnapshot]:
    """An ``IdentitySnapshot`` of ``parties``' identity lists, open while the block runs."""
    with ExitStack() as stack:
        yield IdentitySnapshot(url, loaded, parties, stack)


def previous_match(conn: psycopg.Connection, collab: str) -> tuple[str, int, datetime] | None:
    """(input digest, matched count, built at) of the current cross-reference, if one exists."""
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    row = conn.execute(
        sql.SQL("select input_digest, matched, built_at from {} order by built_at desc limit 1").format(sql.Identifier(schema, "cross_reference_builds"))
    ).fetchone()
    return (str(row[0]), int(row[1]), row[2]) if row else None


class CrossReferenceWriter:
    """Rows of a new cross-reference, written a bucket at a time into a table that replaces the current one at the end."""

    def __init__(self, conn: psycopg.Connection, table: sql.Identifier, columns: Sequence[str], client_at: int) -> None:
        self._conn, self.table, self.columns, self._at = conn, table, list(columns), client_at
        self.rows = 0

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        """Append rows (match_id, each party's token); the client's unit number is added here."""
        copy_sql = sql.SQL("copy {} ({}, unit) from stdin").format(self.table, sql.SQL(", ").join(map(sql.Identifier, self.columns)))
        with self._conn.cursor().copy(copy_sql) as copy:
            for row in rows:
                copy.write_row((*row, matching.unit_of(row[self._at])))
        self.rows += len(rows)


@contextmanager
def replacing_cross_reference(conn: psycopg.Connection, collab: str, parties: Sequence[str], client: str, *,
                              shuffled: bool = False) -> Iterator[CrossReferenceWriter]:
    """Write a new cross-reference bucket by bucket; it is swapped in, in the same transaction, when the block ends.

    An error inside the block (a PSI process died, the run was killed) rolls everything back: the current
    cross-reference and its build record stay as they were. The caller records the build with ``record_build``
    inside the block. ``shuffled``: the rows are stored in match_id order, not in the order written (padding
    written after the real rows must not be told apart by its place).
    """
    schema = naming.matching_schema(collab)
    migrations.ensure(conn, "matching", schema)
    columns = ["match_id", *(naming.party_token_column(p) for p in parties)]
    new = sql.Identifier(schema, "cross_reference__new")
    with conn.transaction():
        conn.execute(sql.SQL("drop table if exists {}").format(new))
        conn.execute(sql.SQL("create table {} ({}, unit bigint not null)").format(
            new, sql.SQL(", ").join(sql.SQL("{} text not null").format(sql.Identifier(col)) for col in columns)))
        yield CrossReferenceWriter(conn, new, columns, 1 + list(parties).index(client))
        conn.execute(sql.SQL("drop table if exists {} cascade").format(sql.Identifier(schema, "cross_reference")))
        if shuffled:
            conn.execute(sql.SQL("create table {} (like {} including all)").format(sql.Identifier(schema, "cross_reference"), new))
            conn.execute(sql.SQL("insert into {} select * from {} order by match_id").format(sql.Identifier(schema, "cross_reference"), new))
            conn.execute(sql.SQL("drop table {}").format(new))
        else:
            conn.execute(sql.SQL("alter table {} rename to cross_reference").format(new))
        conn.execute(sql.SQL("alter table {} add primary key (match_id)").format(sql.Identifier(schema, "cross_reference")))


def record_build(conn: psycopg.Connection, collab: str, digest: str, matched: int) -> None:
    """Record what the cross-reference was built from (inside ``replacing_cross_reference``: the same transaction)."""
    conn.execute(sql.SQL("insert into {} (input_digest, matched) values (%s, %s)").format(
        sql.Identifier(naming.matching_schema(collab), "cross_reference_builds")), (digest, matched))


def write_cross_reference(conn: psycopg.Connection, collab: str, result: matching.MatchResult, digest: str, client: str) -> None:
    """Swap in a new cross-reference (one random match_id, each party's token, the client's unit) and record its build."""
    with replacing_cross_reference(conn, collab, result.parties, client) as writer:
        writer.write(result.rows)
        record_build(conn, collab, digest, result.matched)


def read_records(url: str, loaded: LoadedCollaboration, parties: Sequence[str]) -> list[identity_graph.PartyRecords]:
    """Several identifiers or party subsets: each party's identity records, read as that party's own role."""
    kinds = tuple(k.value for k in loaded.collaboration.identity.kinds)
    columns = sql.SQL(", ").join(sql.Identifier(f"{part}__{k}") for k in kinds for part in ("token", "identifier"))
    out = []
    for party in parties:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("set role {}").format(sql.Identifier(access.role_name(loaded.name, party, "staging_loader"))))
            rows = conn.execute(sql.SQL("select {} from {}").format(columns, sql.Identifier(naming.raw_schema(loaded.name, party), "identities"))).fetchall()
        out.append(identity_graph.PartyRecords(party, kinds, [tuple(r) for r in rows]))
    return out


def write_overlaps(conn: psycopg.Connection, loaded: LoadedCollaboration, result: identity_graph.GraphResult, digest: str) -> None:
    """Swap in every set of parties' cross-reference and links in one transaction and record the build (an error keeps
    the current ones)."""
    c, schema = loaded.name, naming.matching_schema(loaded.name)
    migrations.ensure(conn, "matching", schema)
    with conn.transaction():
        for subset, overlap in result.overlaps.items():
            suffix = naming.overlap_suffix(subset, loaded.parties())
            xref, links = naming.cross_reference_table(suffix), naming.links_table(suffix)
            columns = ["match_id", *(naming.party_token_column(p) for p in subset), "unit"]
            link_columns = ["match_id", "party", *(f"token__{k.value}" for k in loaded.collaboration.identity.kinds)]
            for table, ddl, cols, rows in (
                (xref, sql.SQL(", ").join([*(sql.SQL("{} text not null").format(sql.Identifier(col)) for col in columns[:-1]), sql.SQL("unit bigint not null")]),
                 columns, overlap.rows),
                (links, sql.SQL(", ").join(sql.SQL("{} text not null").format(sql.Identifier(col)) for col in link_columns), link_columns, overlap.links),
            ):
                new = sql.Identifier(schema, f"{table}__new")
                conn.execute(sql.SQL("drop table if exists {}").format(new))
                conn.execute(sql.SQL("create table {} ({})").format(new, ddl))
                with conn.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(new, sql.SQL(", ").join(map(sql.Identifier, cols)))) as copy:
                    for row in rows:
                        copy.write_row(row)
                conn.execute(sql.SQL("drop table if exists {} cascade").format(sql.Identifier(schema, table)))
                conn.execute(sql.SQL("alter table {} rename to {}").format(new, sql.Identifier(table)))
            conn.execute(sql.SQL("alter table {} add primary key (match_id)").format(sql.Identifier(schema, xref)))
            # one row per record (its token of each kind, "" where it has none): what a matched view's row joins on
            conn.execute(sql.SQL("alter table {} add primary key ({})").format(
                sql.Identifier(schema, links), sql.SQL(", ").join(map(sql.Identifier, link_columns[1:]))))
        record_build(conn, c, digest, result.overlaps[loaded.parties()].matched)


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


def bucket_builds(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str]) -> dict[int, tuple[str, int]]:
    """Each built bucket's (input digest, bytes its PSI exchanged)."""
    _, builds = _pairs_table(conn, loaded, columns)
    return {int(b): (str(d), int(n)) for b, d, n in conn.execute(sql.SQL("select bucket, input_digest, bytes_exchanged from {}").format(builds)).fetchall()}


def bucket_pairs(conn: psycopg.Connection, loaded: LoadedCollaboration, columns: Sequence[str]) -> tuple[list[tuple[str, ...]], int]:
    """Every bucket's pairs (bucket order) and the bytes their PSI exchanged."""
    pairs_table, builds = _pairs_table(conn, loaded, columns)
    pairs = conn.execute(sql.SQL("select {} from {} order by bucket").format(sql.SQL(", ").join(map(sql.Identifier, columns)), pairs_table)).fetchall()
    row = conn.execute(sql.SQL("select coalesce(sum(bytes_exchanged), 0) from {}").format(builds)).fetchone()
    return [tuple(p) for p in pairs], int(row[0]) if row else 0


def stream_bucket_pairs(url: str, loaded: LoadedCollaboration, columns: Sequence[str]) -> Generator[tuple[int, list[tuple[str, ...]]]]:
    """The bucket steps' pairs one bucket at a time, in bucket order; a bucket without pairs is absent."""
    with psycopg.connect(url) as conn:
        pairs_table, _ = _pairs_table(conn, loaded, columns)
        with conn.transaction(), conn.cursor(name="dcr_bucket_pairs") as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(sql.SQL("select bucket, {} from {} order by bucket").format(sql.SQL(", ").join(map(sql.Identifier, columns)), pairs_table))
            for bucket, rows in itertools.groupby(cur, key=lambda row: int(row[0])):
                yield bucket, [tuple(r[1:]) for r in rows]
