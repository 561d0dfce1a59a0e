"""Load an upload into a party's raw schema as a new version, validated, then swapped in atomically.

1. The file (CSV, Parquet or JSON Lines) is streamed in chunks into a text
   load table with PostgreSQL ``COPY``; each row keeps its number
   (``dcr_line``, 1 = first data row). Nothing holds the whole file.
2. The load is cast into the declared types (a bad value is named by row and
   column) as the new version table ``<dataset>__v<N>``.
3. The dataset's contract runs on it with great-expectations, in PostgreSQL.
4. Only if everything passed, one transaction repoints the ``<dataset>``
   view and the version record. Otherwise the new tables are dropped, the
   file goes to quarantine beside a JSON report, and the current version
   stays exactly as it was.

Re-submitting the checksum of the current version loads nothing.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..lib.policy.models import Dataset
from ..lib.validation import ROW_NUMBER, ValidationReport, sqlalchemy_url, validate_table
from ..store import migrations

META_SCHEMA = "dcr_meta"
CHUNK = 1 << 20
BATCH_ROWS = 50_000
KEEP_VERSIONS = 2


class UploadRejected(Exception):
    """The upload breaks the dataset's contract; nothing was changed."""

    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class IngestResult:
    version: int
    checksum: str
    rows: int
    unchanged: bool
    table: str
    report: ValidationReport | None = None
    null_fractions: dict[str, float] = field(default_factory=dict)
    duplicate_rows: int = 0


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def ensure_meta(conn: psycopg.Connection) -> None:
    migrations.ensure(conn, "meta")


def current_versions(conn: psycopg.Connection, collaboration: str) -> dict[str, dict[str, object]]:
    """``party.dataset`` -> {version, checksum} of every current upload of a collaboration."""
    ensure_meta(conn)
    rows = conn.execute(
        "select party, dataset, version, checksum from dcr_meta.dataset_versions "
        "where collaboration = %s and is_current order by party, dataset",
        (collaboration,),
    ).fetchall()
    return {f"{p}.{d}": {"version": v, "checksum": c} for p, d, v, c in rows}


def versions(conn: psycopg.Connection, collaboration: str, party: str, dataset: str) -> list[dict[str, Any]]:
    """Every accepted version of a dataset, newest first (the audit trail of uploads)."""
    ensure_meta(conn)
    rows = conn.execute(
        "select version, checksum, row_count, file_name, loaded_at, is_current from dcr_meta.dataset_versions "
        "where collaboration = %s and party = %s and dataset = %s order by version desc",
        (collaboration, party, dataset),
    ).fetchall()
    keys = ("version", "checksum", "row_count", "file_name", "loaded_at", "is_current")
    return [dict(zip(keys, r, strict=False)) for r in rows]


# --- readers: every format becomes rows of text, streamed --------------------------------


def _csv_header(path: Path, ds: Dataset) -> list[str]:
    with path.open("rb") as handle:
        first = handle.readline()
    try:
        line = first.decode(ds.format.encoding)
    except UnicodeDecodeError as exc:
        raise UploadRejected(f"{path.name}: the header is not valid {ds.format.encoding} text (byte {exc.start})") from None
    header = next(csv.reader([line], delimiter=ds.format.delimiter, quotechar=ds.format.quote), None)
    if not header:
        raise UploadRejected(f"{path.name}: the file is empty; a header row is required")
    return [h.strip() for h in header]


def _parquet_file(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise UploadRejected(f"{path.name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None


def _jsonl_rows(path: Path, ds: Dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    decoder = codecs.getincrementaldecoder(ds.format.encoding)()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError:
                raise UploadRejected(f"{path.name}: line {number} is not valid {ds.format.encoding} text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UploadRejected(f"{path.name}: line {number} is not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise UploadRejected(f"{path.name}: line {number} is not a JSON object")
            yield number, record


def _jsonl_header(path: Path, ds: Dataset) -> list[str]:
    for _, record in _jsonl_rows(path, ds):
        return list(record)
    raise UploadRejected(f"{path.name}: the file is empty")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_header(path: Path, header: list[str], ds: Dataset, dataset_name: str) -> None:
    missing = [c for c in ds.columns if c not in header]
    if missing:
        raise UploadRejected(f"{path.name}: missing column(s) {', '.join(missing)} (declared in the policy for {dataset_name})")
    unknown = [h for h in header if h not in ds.columns]
    if unknown and ds.unknown_columns == "reject":
        raise UploadRejected(f"{path.name}: unknown column(s) {', '.join(unknown)} (dataset {dataset_name} rejects undeclared columns)")
    if len(set(header)) != len(header):
        raise UploadRejected(f"{path.name}: duplicate column names in the header")


def _copy_error(exc: psycopg.Error, path: Path) -> str:
    """A COPY failure without the offending value (it may be an identifier)."""
    context = exc.diag.context or ""
    where = re.search(r"line (\d+)(?:, column (\w+))?", context)
    reason = (exc.diag.message_primary or str(exc)).split(":")[0]
    if where:
        column = f", column {where.group(2)}" if where.group(2) else ""
        # COPY counts the header as line 1; reports count data rows from 1.
        return f"{path.name}: row {int(where.group(1)) - 1}{column}: {reason}"
    return f"{path.name}: {reason}"


def _load(conn: psycopg.Connection, path: Path, ds: Dataset, dataset_name: str, schema: str, load: str) -> None:
    """Stream the file into ``schema.load`` (text columns + dcr_line)."""
    fmt = ds.format.type
    if fmt == "csv":
        header = _csv_header(path, ds)
    elif fmt == "parquet":
        header = [f.name for f in _parquet_file(path).schema_arrow]
    else:
        header = _jsonl_header(path, ds)
    _check_header(path, header, ds, dataset_name)
    table = sql.Identifier(schema, load)
    text_columns = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(h)) for h in header)
    conn.execute(sql.SQL("drop table if exists {}").format(table))
    conn.execute(sql.SQL("create unlogged table {} ({} bigserial, {})").format(table, sql.Identifier(ROW_NUMBER), text_columns))
    columns = sql.SQL(", ").join(map(sql.Identifier, header))
    try:
        if fmt == "csv":
            copy_sql = sql.SQL("copy {} ({}) from stdin with (format csv, header true, delimiter {}, quote {}, encoding {})").format(
                table, columns, sql.Literal(ds.format.delimiter), sql.Literal(ds.format.quote),
                sql.Literal(ds.format.encoding.upper().replace("-", "")),
            )
            with conn.cursor().copy(copy_sql) as copy, path.open("rb") as handle:
                while block := handle.read(CHUNK):
                    copy.write(block)
            return
        with conn.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(table, columns)) as copy:
            if fmt == "parquet":
                for batch in _parquet_file(path).iter_batches(batch_size=BATCH_ROWS):
                    for row in zip(*(batch.column(h).to_pylist() for h in header), strict=False):
                        copy.write_row([_text(v) for v in row])
            else:
                for _, record in _jsonl_rows(path, ds):
                    copy.write_row([_text(record.get(h)) for h in header])
    except (psycopg.errors.DataError, psycopg.errors.BadCopyFileFormat) as exc:
        raise UploadRejected(_copy_error(exc, path)) from None
    except OSError as exc:  # pyarrow reports a truncated file while reading batches
        raise UploadRejected(f"{path.name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None
    except Exception as exc:
        if type(exc).__module__.startswith("pyarrow"):
            raise UploadRejected(f"{path.name}: not a valid Parquet file ({str(exc).splitlines()[0][:120]})") from None
        raise


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
                sql.SQL("create table {} as select {}, {} from {} order by {}").format(
                    sql.Identifier(schema, table), sql.Identifier(ROW_NUMBER), casts, sql.Identifier(schema, load), sql.Identifier(ROW_NUMBER)
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
            sql.SQL("select {} from {} where nullif(btrim({}), '') is not null and not {} order by 1 limit 1").format(
                sql.Identifier(ROW_NUMBER), sql.Identifier(schema, load), sql.Identifier(name), predicate
            )
        ).fetchone()
        if bad is not None:
            return f"row {bad[0]}: column {name} is not a valid {col.type.value}"
    return "a value does not match its declared type"


def _profile(conn: psycopg.Connection, schema: str, table: str, ds: Dataset) -> tuple[dict[str, float], int]:
    """Null fraction per column and number of duplicate rows (metadata for the UI; counts only)."""
    names = list(ds.columns)
    counts = sql.SQL(", ").join(sql.SQL("count({})").format(sql.Identifier(n)) for n in names)
    row = conn.execute(sql.SQL("select count(*), {} from {}").format(counts, sql.Identifier(schema, table))).fetchone()
    total = int(row[0]) or 1  # type: ignore[index]
    nulls = {n: round(1 - int(c) / total, 6) for n, c in zip(names, row[1:], strict=False)}  # type: ignore[index]
    cols = sql.SQL(", ").join(map(sql.Identifier, names))
    distinct = conn.execute(sql.SQL("select count(*) from (select distinct {} from {}) d").format(cols, sql.Identifier(schema, table))).fetchone()[0]  # type: ignore[index]
    return nulls, int(row[0]) - int(distinct)  # type: ignore[index]


def ingest_file(
    conn: psycopg.Connection,
    collaboration: str,
    party: str,
    dataset_name: str,
    ds: Dataset,
    path: Path,
    schema: str,
    *,
    database_url: str,
    tokenised: bool = False,
) -> IngestResult:
    """Load, validate and swap in ``path`` as the next version, or raise ``UploadRejected`` and change nothing."""
    ensure_meta(conn)
    checksum = file_checksum(path)
    lock = f"dcr-ingest:{collaboration}:{party}:{dataset_name}"
    current = conn.execute(
        "select version, checksum, row_count from dcr_meta.dataset_versions "
        "where collaboration = %s and party = %s and dataset = %s and is_current",
        (collaboration, party, dataset_name),
    ).fetchone()
    if current is not None and current[1] == checksum:
        return IngestResult(current[0], checksum, current[2], True, f"{dataset_name}__v{current[0]}")
    conn.execute("select pg_advisory_lock(hashtext(%s))", (lock,))
    try:
        latest = conn.execute(
            "select coalesce(max(version), 0) from dcr_meta.dataset_versions where collaboration = %s and party = %s and dataset = %s",
            (collaboration, party, dataset_name),
        ).fetchone()
        version = int(latest[0]) + 1  # type: ignore[index]
        table, load = f"{dataset_name}__v{version}", f"{dataset_name}__v{version}__load"
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        try:
            _load(conn, path, ds, dataset_name, schema, load)
            _create_typed(conn, schema, table, load, ds)
            report = validate_table(sqlalchemy_url(database_url), schema, table, ds, dataset_name, tokenised)
            if not report.success:
                lines = "; ".join(o.describe() for o in report.failures())
                raise UploadRejected(f"{path.name}: {len(report.failures())} rule(s) failed: {lines}", report)
            nulls, duplicates = _profile(conn, schema, table, ds)
            columns = sql.SQL(", ").join(map(sql.Identifier, ds.columns))
            with conn.transaction():
                # The swap: repoint the dataset's view and the version record together.
                conn.execute(sql.SQL("drop view if exists {}").format(sql.Identifier(schema, dataset_name)))
                conn.execute(sql.SQL("create view {} as select {} from {}").format(sql.Identifier(schema, dataset_name), columns, sql.Identifier(schema, table)))
                conn.execute(
                    "update dcr_meta.dataset_versions set is_current = false where collaboration = %s and party = %s and dataset = %s",
                    (collaboration, party, dataset_name),
                )
                conn.execute(
                    "insert into dcr_meta.dataset_versions (collaboration, party, dataset, version, checksum, row_count, file_name, is_current) "
                    "values (%s, %s, %s, %s, %s, %s, %s, true)",
                    (collaboration, party, dataset_name, version, checksum, report.row_count, path.name),
                )
                for old in range(1, version - KEEP_VERSIONS + 1):
                    conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, f"{dataset_name}__v{old}")))
        except BaseException:
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, table)))
            raise
        finally:
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(schema, load)))
    finally:
        conn.execute("select pg_advisory_unlock(hashtext(%s))", (lock,))
    return IngestResult(version, checksum, report.row_count, False, table, report, nulls, duplicates)


def quarantine(path: Path, quarantine_root: Path, report: dict[str, Any], *, move: bool) -> Path:
    """Put a rejected file under ``quarantine_root`` with ``<name>.report.json`` beside it."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    target = quarantine_root / f"{stamp}__{path.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        shutil.move(str(path), target)
    else:
        shutil.copy2(path, target)
    target.with_name(target.name + ".report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return target


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies within ``root``."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False

