"""Load an upload into a party's raw schema as a new version, swapped in atomically.

The file is streamed into a fresh table with PostgreSQL ``COPY`` (never held
in memory), checked against the dataset's contract, and only then made
current by repointing the ``<dataset>`` view in one transaction. A failed
upload leaves the current version untouched. Re-submitting a file with the
checksum of the current version loads nothing.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from .policy.models import Dataset

META_SCHEMA = "dcr_meta"
CHUNK = 1 << 20
KEEP_VERSIONS = 2


class UploadRejected(Exception):
    """The upload breaks the dataset's contract; nothing was changed."""


@dataclass(frozen=True)
class IngestResult:
    version: int
    checksum: str
    rows: int
    unchanged: bool
    table: str


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def ensure_meta(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(META_SCHEMA)))
    conn.execute(
        """
        create table if not exists dcr_meta.dataset_versions (
            collaboration text not null,
            party text not null,
            dataset text not null,
            version integer not null,
            checksum text not null,
            row_count bigint not null,
            file_name text not null,
            loaded_at timestamptz not null default now(),
            is_current boolean not null default false,
            primary key (collaboration, party, dataset, version)
        )
        """
    )
    conn.commit()


def current_versions(conn: psycopg.Connection, collaboration: str) -> dict[str, dict[str, object]]:
    """``party.dataset`` -> {version, checksum} of every current upload of a collaboration."""
    ensure_meta(conn)
    rows = conn.execute(
        "select party, dataset, version, checksum from dcr_meta.dataset_versions "
        "where collaboration = %s and is_current order by party, dataset",
        (collaboration,),
    ).fetchall()
    return {f"{p}.{d}": {"version": v, "checksum": c} for p, d, v, c in rows}


def _header(path: Path, ds: Dataset) -> list[str]:
    try:
        with path.open("r", encoding=ds.format.encoding, newline="") as handle:
            reader = csv.reader(handle, delimiter=ds.format.delimiter, quotechar=ds.format.quote)
            header = next(reader, None)
    except UnicodeDecodeError as exc:
        raise UploadRejected(f"{path.name}: not valid {ds.format.encoding} text (byte {exc.start} of the header)") from None
    if not header:
        raise UploadRejected(f"{path.name}: the file is empty; a header row is required")
    return [h.strip() for h in header]


def _copy_error(exc: psycopg.Error, path: Path) -> str:
    """A COPY failure without the offending value (it may be an identifier)."""
    context = exc.diag.context or ""
    where = re.search(r"line (\d+)(?:, column (\w+))?", context)
    reason = (exc.diag.message_primary or str(exc)).split(":")[0]
    if where:
        column = f", column {where.group(2)}" if where.group(2) else ""
        return f"{path.name}: line {where.group(1)}{column}: {reason}"
    return f"{path.name}: {reason}"


def ingest_csv(conn: psycopg.Connection, collaboration: str, party: str, dataset_name: str, ds: Dataset, path: Path, schema: str) -> IngestResult:
    """Load ``path`` as the next version of the dataset, or raise ``UploadRejected`` and change nothing."""
    ensure_meta(conn)
    checksum = file_checksum(path)
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-ingest:{collaboration}:{party}:{dataset_name}",))
        current = conn.execute(
            "select version, checksum, row_count from dcr_meta.dataset_versions "
            "where collaboration = %s and party = %s and dataset = %s and is_current",
            (collaboration, party, dataset_name),
        ).fetchone()
        if current is not None and current[1] == checksum:
            return IngestResult(current[0], checksum, current[2], True, f"{dataset_name}__v{current[0]}")
        latest = conn.execute(
            "select coalesce(max(version), 0) from dcr_meta.dataset_versions where collaboration = %s and party = %s and dataset = %s",
            (collaboration, party, dataset_name),
        ).fetchone()
    version = int(latest[0]) + 1  # type: ignore[index]
    header = _header(path, ds)
    missing = [c for c in ds.columns if c not in header]
    if missing:
        raise UploadRejected(f"{path.name}: missing column(s) {', '.join(missing)} (declared in the policy for {dataset_name})")
    unknown = [h for h in header if h not in ds.columns]
    if unknown and ds.unknown_columns == "reject":
        raise UploadRejected(f"{path.name}: unknown column(s) {', '.join(unknown)} (dataset {dataset_name} rejects undeclared columns)")
    if len(set(header)) != len(header):
        raise UploadRejected(f"{path.name}: duplicate column names in the header")

    table = f"{dataset_name}__v{version}"
    load = f"{table}__load"
    schema_id = sql.Identifier(schema)
    conn.execute(sql.SQL("create schema if not exists {}").format(schema_id))
    # Load every file column as text, then cast: a bad value is reported by row and column.
    file_columns = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(h)) for h in header)
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, load)))
    conn.execute(sql.SQL("create unlogged table {} (dcr_line bigserial, {})").format(sql.Identifier(schema, load), file_columns))
    copy_sql = sql.SQL("copy {} ({}) from stdin with (format csv, header true, delimiter {}, quote {}, encoding {})").format(
        sql.Identifier(schema, load),
        sql.SQL(", ").join(map(sql.Identifier, header)),
        sql.Literal(ds.format.delimiter),
        sql.Literal(ds.format.quote),
        sql.Literal(ds.format.encoding.upper().replace("-", "")),
    )
    try:
        with conn.transaction():
            with conn.cursor().copy(copy_sql) as copy, path.open("rb") as handle:
                while block := handle.read(CHUNK):
                    copy.write(block)
            _create_typed(conn, schema, table, load, ds)
            rows = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table))).fetchone()[0]  # type: ignore[index]
            _check_contract(conn, schema, table, ds, path, rows)
            conn.execute(sql.SQL("drop table {}").format(sql.Identifier(schema, load)))
            # The swap: repoint the dataset's view and the version record together.
            conn.execute(sql.SQL("drop view if exists {}").format(sql.Identifier(schema, dataset_name)))
            conn.execute(sql.SQL("create view {} as select * from {}").format(sql.Identifier(schema, dataset_name), sql.Identifier(schema, table)))
            conn.execute(
                "update dcr_meta.dataset_versions set is_current = false where collaboration = %s and party = %s and dataset = %s",
                (collaboration, party, dataset_name),
            )
            conn.execute(
                "insert into dcr_meta.dataset_versions (collaboration, party, dataset, version, checksum, row_count, file_name, is_current) "
                "values (%s, %s, %s, %s, %s, %s, %s, true)",
                (collaboration, party, dataset_name, version, checksum, rows, path.name),
            )
            for old in range(1, version - KEEP_VERSIONS + 1):
                conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, f"{dataset_name}__v{old}")))
    except psycopg.errors.DataError as exc:
        raise UploadRejected(_copy_error(exc, path)) from None
    except psycopg.errors.BadCopyFileFormat as exc:
        raise UploadRejected(_copy_error(exc, path)) from None
    return IngestResult(version, checksum, int(rows), False, table)


def _create_typed(conn: psycopg.Connection, schema: str, table: str, load: str, ds: Dataset) -> None:
    """Cast the text load into the declared types; on failure, name the first bad row and column."""
    casts = sql.SQL(", ").join(
        sql.SQL("cast(nullif(btrim({c}), '') as {t}) as {c}").format(c=sql.Identifier(n), t=sql.SQL(col.type.sql))
        if col.type.sql != "text"
        else sql.SQL("{c}").format(c=sql.Identifier(n))
        for n, col in ds.columns.items()
    )
    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, table)))
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("create table {} as select {} from {} order by dcr_line").format(
                    sql.Identifier(schema, table), casts, sql.Identifier(schema, load)
                )
            )
    except psycopg.errors.DataError:
        raise UploadRejected(_first_bad_value(conn, schema, load, ds)) from None


def _first_bad_value(conn: psycopg.Connection, schema: str, load: str, ds: Dataset) -> str:
    """Which row and column broke the cast (never the value: it may be an identifier)."""
    if conn.info.server_version >= 160000:
        check = "pg_input_is_valid(btrim({c}), {t})"
    else:  # PostgreSQL 15 and MPP dialects: a temporary PL/pgSQL probe (core language, no extension)
        conn.execute(
            "create or replace function pg_temp.dcr_input_is_valid(v text, t text) returns boolean language plpgsql as $$ "
            "begin execute format('select cast(%L as %s)', v, t); return true; exception when others then return false; end $$"
        )
        check = "pg_temp.dcr_input_is_valid(btrim({c}), {t})"
    for name, col in ds.columns.items():
        if col.type.sql == "text":
            continue
        predicate = sql.SQL(check).format(c=sql.Identifier(name), t=sql.Literal(col.type.sql))
        bad = conn.execute(
            sql.SQL("select dcr_line from {} where nullif(btrim({}), '') is not null and not {} order by dcr_line limit 1").format(
                sql.Identifier(schema, load), sql.Identifier(name), predicate
            )
        ).fetchone()
        if bad is not None:
            return f"row {bad[0]}: column {name} is not a valid {col.type.value}"
    return "a value does not match its declared type"


def _check_contract(conn: psycopg.Connection, schema: str, table: str, ds: Dataset, path: Path, rows: int) -> None:
    if rows < ds.rows.min:
        raise UploadRejected(f"{path.name}: {rows} data rows, fewer than the minimum {ds.rows.min}")
    if ds.rows.max is not None and rows > ds.rows.max:
        raise UploadRejected(f"{path.name}: {rows} data rows, more than the maximum {ds.rows.max}")
    for name, col in ds.columns.items():
        if not col.nullable:
            nulls = conn.execute(
                sql.SQL("select count(*) from {} where {} is null or btrim(cast({} as text)) = ''").format(
                    sql.Identifier(schema, table), sql.Identifier(name), sql.Identifier(name)
                )
            ).fetchone()[0]  # type: ignore[index]
            if nulls:
                raise UploadRejected(f"{path.name}: column {name} is null or blank in {nulls} row(s) (not nullable)")
