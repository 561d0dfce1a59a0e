"""Stage bookkeeping: what each dbt stage was last built from, and the counts a staging build reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from . import migrations


def last_build(conn: psycopg.Connection, collab: str, stage: str) -> str | None:
    """The digest of the stage's last successful build, if any."""
    migrations.ensure(conn, "meta")
    row = conn.execute("select digest from dcr_meta.stage_builds where collaboration = %s and stage = %s", (collab, stage)).fetchone()
    return str(row[0]) if row else None


def relations_exist(conn: psycopg.Connection, relations: Iterable[str]) -> bool:
    return all(conn.execute("select to_regclass(%s)", (rel,)).fetchone()[0] is not None for rel in relations)  # type: ignore[index]


def can_skip(conn: psycopg.Connection, collab: str, stage: str, digest: str, relations: Iterable[str]) -> bool:
    """Whether the stage's last successful build had this digest and its relations are all still there."""
    return last_build(conn, collab, stage) == digest and relations_exist(conn, relations)


def record_build(conn: psycopg.Connection, collab: str, stage: str, digest: str) -> None:
    migrations.ensure(conn, "meta")
    conn.execute(
        "insert into dcr_meta.stage_builds (collaboration, stage, digest) values (%s, %s, %s) on conflict (collaboration, stage) "
        "do update set digest = excluded.digest, built_at = now()",
        (collab, stage, digest),
    )


def current_parts(conn: psycopg.Connection, collab: str, party: str, dataset: str) -> list[str]:
    """The upload tables of a dataset's current version (its view is their union)."""
    row = conn.execute("select parts from dcr_meta.dataset_versions where collaboration = %s and party = %s and dataset = %s and is_current",
                       (collab, party, dataset)).fetchone()
    return list(row[0]) if row and row[0] else []


def held_parts(conn: psycopg.Connection, schema: str, table: str) -> set[str] | None:
    """The upload tables an incremental normalised table holds rows of; None if it does not exist or predates them."""
    found = conn.execute("select 1 from information_schema.columns where table_schema = %s and table_name = %s and column_name = '_dcr_part'",
                         (schema, table)).fetchone()
    if not found:
        return None
    return {str(r[0]) for r in conn.execute(sql.SQL("select distinct _dcr_part from {}").format(sql.Identifier(schema, table))).fetchall()}


def forget_build(conn: psycopg.Connection, collab: str, stage: str) -> None:
    """The stage's tables no longer match its last recorded build: the next run must not skip it."""
    migrations.ensure(conn, "meta")
    conn.execute("delete from dcr_meta.stage_builds where collaboration = %s and stage = %s", (collab, stage))


def staging_counts(conn: psycopg.Connection, loaded: LoadedCollaboration, only: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """Per dataset (of ``only``, default all): rows in, rows staged, identifiers accepted (``accepted_<column>``),
    changed by normalisation (``changed_<column>``: case, spaces, a phone number's format) and rejected per reason
    (``rejected_<column>_<reason>``); counts only."""
    c = loaded.name
    out: dict[str, dict[str, int]] = {}
    wanted = set(loaded.collaboration.datasets) if only is None else set(only)
    for name, ds in loaded.collaboration.datasets.items():
        if name not in wanted:
            continue
        table = sql.Identifier(naming.raw_schema(c, ds.owner), f"{name}__normalised")
        counts = {
            "rows_in": _count(conn, table),
            "rows_staged": _count(conn, sql.Identifier(naming.staging_schema(c, ds.owner), name)),
        }
        for col in ds.identifier_columns:
            problem = sql.Identifier(f"{col}__problem")
            counts[f"accepted_{col}"] = int(conn.execute(sql.SQL("select count(*) from {t} where {p} is null").format(  # type: ignore[index]
                p=problem, t=table)).fetchone()[0])
            if not loaded.at_home(ds.owner):  # a home party's tokens arrive made; nothing is normalised here
                counts[f"changed_{col}"] = int(conn.execute(sql.SQL("select count(*) from {t} where {c}").format(  # type: ignore[index]
                    c=sql.Identifier(f"{col}__changed"), t=table)).fetchone()[0])
            for reason, count in conn.execute(
                sql.SQL("select {p}, count(*) from {t} where {p} is not null group by {p} order by 1").format(p=problem, t=table)
            ).fetchall():
                counts[f"rejected_{col}_{reason}"] = int(count)
        out[name] = counts
    return out


@dataclass(frozen=True)
class IdentifierQuality:
    dataset: str
    owner: str
    column: str
    accepted: int
    reasons: dict[str, int]
    limit: float
    changed: int | None = None  # accepted identifiers that normalising changed (None: tokenised at home)

    @property
    def refused(self) -> int:
        return sum(self.reasons.values())

    @property
    def share(self) -> float:
        total = self.accepted + self.refused
        return self.refused / total if total else 0.0

    @property
    def above(self) -> bool:
        return self.share > self.limit + 1e-12


def identifier_quality(loaded: LoadedCollaboration, counts: dict[str, dict[str, int]], owner: str | None = None) -> list[IdentifierQuality]:
    """``staging_counts`` per identifier column (of ``owner``'s datasets, default all), with the column's limit."""
    out = []
    for name, ds in loaded.collaboration.datasets.items():
        if name not in counts or owner not in (None, ds.owner):
            continue
        for col, spec in ds.identifier_columns.items():
            prefix = f"rejected_{col}_"
            reasons = {k.removeprefix(prefix): v for k, v in sorted(counts[name].items()) if k.startswith(prefix)}
            out.append(IdentifierQuality(name, ds.owner, col, counts[name].get(f"accepted_{col}", 0), reasons, float(spec.max_invalid_fraction),
                                         counts[name].get(f"changed_{col}")))
    return out


def _count(conn: psycopg.Connection, table: sql.Identifier) -> int:
    row = conn.execute(sql.SQL("select count(*) from {}").format(table)).fetchone()
    return int(row[0]) if row else 0
