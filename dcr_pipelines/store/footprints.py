"""Where released rows' people sets are kept for the difference checks (operator-side, never a member's).

One table, ``dcr_meta.released_people``, in a schema no member role can
use. Every thresholded row that reaches a member (ad-hoc results and
threshold-rule releases) leaves its people set here for
``difference_checks.retention_days``. Checking and recording happen under
one lock per collaboration, so two concurrent queries cannot both pass
against a history that lacks the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg

from ..lib.privacy import difference
from ..lib.privacy.difference import Earlier, People, Verdict
from . import migrations

TABLE = "dcr_meta.released_people"


def lock(conn: psycopg.Connection, collaboration: str) -> None:
    """Serialise difference checks of one collaboration until the current transaction ends."""
    conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"dcr-footprints:{collaboration}",))


def ensure(conn: psycopg.Connection) -> None:
    migrations.ensure(conn, "meta")


def _candidates(conn: psycopg.Connection, collaboration: str, sizes: Sequence[int], threshold: int, retention_days: int) -> list[Earlier]:
    if not sizes:
        return []
    low, high = min(sizes) - threshold + 1, max(sizes) + threshold - 1
    rows = conn.execute(
        f"select source, source_id, row_no, size, sample from {TABLE} "
        "where collaboration = %s and size between %s and %s and released_at > now() - make_interval(days => %s)",
        (collaboration, low, high, retention_days),
    ).fetchall()
    return [Earlier(r[0], r[1], int(r[2]), int(r[3]), difference.from_bytes(r[4])) for r in rows]


def _load(conn: psycopg.Connection, collaboration: str) -> Callable[[Earlier], People]:
    def load(earlier: Earlier) -> People:
        row = conn.execute(
            f"select people from {TABLE} where collaboration = %s and source = %s and source_id = %s and row_no = %s",
            (collaboration, earlier.source, earlier.source_id, earlier.row_no),
        ).fetchone()
        assert row is not None
        return difference.from_bytes(row[0])

    return load


def check(
    conn: psycopg.Connection, collaboration: str, rows: Sequence[People], threshold: int, retention_days: int, *, source: str, source_id: str
) -> list[Verdict]:
    """Verdicts for new rows against the collaboration's history (call under ``lock``)."""
    ensure(conn)
    earlier = _candidates(conn, collaboration, [len(r) for r in rows], threshold, retention_days)
    return difference.check_rows(rows, threshold, earlier, _load(conn, collaboration), source=source, source_id=source_id)


def record(conn: psycopg.Connection, collaboration: str, source: str, source_id: str, rows: Sequence[tuple[int, People]], retention_days: int) -> None:
    """Keep the people sets of rows just released; forget those older than the retention window."""
    ensure(conn)
    conn.execute(
        f"delete from {TABLE} where collaboration = %s and released_at <= now() - make_interval(days => %s)",
        (collaboration, retention_days),
    )
    with conn.cursor() as cursor:
        cursor.executemany(
            f"insert into {TABLE} (collaboration, source, source_id, row_no, size, sample, people) values (%s, %s, %s, %s, %s, %s, %s) "
            "on conflict do nothing",
            [(collaboration, source, source_id, n, int(p.size), difference.to_bytes(difference.sample(p)), difference.to_bytes(p)) for n, p in rows],
        )


def digest(rows: Sequence[tuple[int, People]]) -> str:
    """SHA-256 of the people sets recorded for one run or release, as the audit chain keeps it (empty: nothing recorded)."""
    import hashlib

    h = hashlib.sha256()
    for n, units in sorted(rows, key=lambda r: r[0]):
        h.update(f"{n}:{int(units.size)}:".encode())
        h.update(difference.to_bytes(units))
    return h.hexdigest()


def recorded(conn: psycopg.Connection, collaboration: str, retention_days: int) -> tuple[dict[tuple[str, str], str], str]:
    """(source, source_id) -> digest of the people sets kept now, and the time before which they may have expired
    (for ``dcr audit --verify``)."""
    from ..lib.audit import timestamp

    ensure(conn)
    since = conn.execute("select now() - make_interval(days => %s)", (retention_days,)).fetchone()[0]  # type: ignore[index]
    found: dict[tuple[str, str], list[tuple[int, People]]] = {}
    for source, source_id, row_no, people in conn.execute(
        f"select source, source_id, row_no, people from {TABLE} where collaboration = %s", (collaboration,)
    ).fetchall():
        found.setdefault((source, source_id), []).append((int(row_no), difference.from_bytes(people)))
    return {key: digest(rows) for key, rows in found.items()}, timestamp(since)


def describe(earlier: Earlier, threshold: int) -> str:
    """Why a row was withheld, without saying which people or how many differ."""
    what = "an ad-hoc result" if earlier.source == "ad_hoc" else f"release {earlier.source_id}" if earlier.source == "release" else earlier.source
    return f"its people differ from those of a row of {what} by fewer than {threshold}"
