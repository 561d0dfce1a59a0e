"""Phone numbers normalised by the operator: computed in Python (``lib.identifiers.phone``, the `phonenumbers`
library), kept in the party's raw schema as ``_dcr_phone_e164`` (region, raw text, E.164 or the reason it has none),
and joined by the party's normalised model (``lib/templates/normalised.sql.j2``). SQL has no numbering plans, so the
one function a party matching at home also runs is the only rule: a number is normalised alike on both sides.

The table is a cache of a pure function of (region, raw text): rows are added for values not seen yet and never
change, so a killed ingest leaves it correct, and a new dataset or a withdraw needs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

TABLE = "_dcr_phone_e164"
BATCH = 20_000


def ensure(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("create table if not exists {} (region text not null, raw text not null, e164 text, problem text, "
                         "primary key (region, raw))").format(sql.Identifier(schema, TABLE)))


def map_new(conn: psycopg.Connection, schema: str, relation: str, column: str, region: str,
            normalise: Callable[[str, str], tuple[str | None, str | None]]) -> int:
    """Normalise every value of ``schema.relation.column`` not in the table yet (for ``region``); how many were added."""
    ensure(conn, schema)
    table = sql.Identifier(schema, TABLE)
    query = sql.SQL("select distinct r.{c} from {rel} r where r.{c} is not null and not exists "
                    "(select 1 from {t} m where m.region = %s and m.raw = r.{c})").format(
        c=sql.Identifier(column), rel=sql.Identifier(schema, relation), t=table)
    added = 0
    with conn.transaction(), conn.cursor(name=f"dcr_phones_{column}"[:60]) as cursor, conn.cursor() as writer:
        cursor.execute(query, (region,))
        while rows := cursor.fetchmany(BATCH):
            with writer.copy(sql.SQL("copy {} (region, raw, e164, problem) from stdin").format(table)) as copy:
                for (raw,) in rows:
                    e164, problem = normalise(str(raw), region)
                    copy.write_row((region, str(raw), e164, problem))
            added += len(rows)
    return added
