"""The upload queue as attacks and accidents: stale files, same-named uploads, hostile files, duplicates, contract changes,
append mode with partitions, leftovers, kills at random instants. Real PostgreSQL, real great-expectations, real Dagster."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.defs.ingest import partitions_name
from dcr_pipelines.lib import naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.runner import HOST_TAG, PID_TAG, fail_orphaned_runs, ingest_uploads, materialize
from dcr_pipelines.services import ingest
from dcr_pipelines.store import uploads as queue

from .conftest import make_collaboration

pytestmark = pytest.mark.slow
HEADER = "customer_email,purchase_value,purchase_date,store_region\n"
REGIONS = ("north", "south", "east", "west")


def rows(n: int, start: int = 0, value: int = 10) -> str:
    return "".join(f"p{i}@example.com,{value + i % 50},2026-02-{1 + i % 27:02d},{REGIONS[i % 4]}\n" for i in range(start, start + n))


@pytest.fixture(scope="module")
def env(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("uploads_policies")
    folder = make_collaboration(root, "uploads", groups=3)
    text = (folder / "collaboration.yaml").read_text()
    (folder / "collaboration.yaml").write_text(text.replace("    mode: replace", "    mode: append"))
    return {"loaded": load_collaboration(folder), "url": runtime.warehouse.url(), "root": root, "runtime": runtime}


def target(env: dict[str, Any], landing: Path, dataset: str = "purchases", *, collab: str | None = None, **spec: Any) -> ingest.Target:
    """A dataset of a collaboration of its own (its own queue, versions and raw schema), with policy fields changed."""
    ds = env["loaded"].collaboration.datasets[dataset]
    if spec:
        ds = ds.model_copy(update=spec)
    name = collab or f"u{uuid.uuid4().hex[:10]}"
    return ingest.Target(name, ds.owner, dataset, ds, naming.raw_schema(name, ds.owner), landing, env["url"])


def drop(t: ingest.Target, name: str, content: bytes | str) -> Path:
    t.inbox.mkdir(parents=True, exist_ok=True)
    path = t.inbox / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def run(t: ingest.Target) -> ingest.QueueOutcome:
    """One pass over the queue, as the ingest asset makes it (it holds the dataset's lock on its connection)."""
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        return ingest.process_queue(conn, t)


def state(t: ingest.Target) -> tuple[Any, ...]:
    """The dataset as its readers see it: the current version and a digest of its rows."""
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        current = ingest.current_version(conn, t)
        if current is None:
            return (None, None, None)
        digest = conn.execute(f'select count(*), md5(string_agg(d::text, \'|\' order by d::text)) from "{t.schema}"."{t.dataset}" d').fetchone()
    return (current.version, current.row_count, digest)


def uploads_of(t: ingest.Target) -> list[queue.Upload]:
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        return queue.listing(conn, t.collaboration, t.party, t.dataset)


# --- the queue: never rolled back, never lost ------------------------------------------------------


def test_a_file_left_by_a_killed_ingest_never_replaces_a_newer_version(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path)
    drop(t, "first.csv", HEADER + rows(3))
    run(t)
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        orphan_seq = queue.next_seq(conn)  # a copy that got its number, then its process was killed before recording it
        newer = ingest.land_copy(conn, t, _file(tmp_path, "newer.csv", HEADER + rows(5)))
    run(t)
    assert state(t)[1] == 5
    # The killed copy's rename lands after the newer upload was accepted; the next start finds and records it.
    (t.queue_dir / queue.stored_name(orphan_seq, "older.csv")).write_text(HEADER + rows(1000))
    outcome = run(t)
    assert state(t)[1] == 5, "an older upload replaced a newer version"
    older = next(u for u in uploads_of(t) if u.seq == orphan_seq)
    assert older.state == "stale" and f"upload #{newer.seq} is already current" in (older.reason or "") and "roll the dataset back" in (older.reason or "")
    assert any("claimed but not recorded" in n for n in outcome.repaired)
    assert (t.quarantine_dir / f"{older.stored_name}.report.json").is_file()


@pytest.mark.parametrize("linked", ["inbox", "party", "queue"])
def test_a_linked_landing_folder_is_refused_and_never_followed(env: dict[str, Any], tmp_path: Path, linked: str) -> None:
    """A party that replaces its inbox (or a folder above it, or its queue folder) with a link to another party's
    would take that party's uploads as its own: the link is reported and nothing behind it is read or moved."""
    victim = target(env, tmp_path, collab="victim")
    theirs = drop(victim, "theirs.csv", HEADER + rows(4))
    t = target(env, tmp_path, collab="thief")
    if linked == "inbox":
        t.inbox.parent.mkdir(parents=True)
        t.inbox.symlink_to(victim.inbox, target_is_directory=True)
    elif linked == "party":
        t.inbox.parent.parent.mkdir(parents=True)
        t.inbox.parent.symlink_to(victim.inbox.parent, target_is_directory=True)
    else:
        drop(t, "mine.csv", HEADER + rows(2))
        t.queue_dir.parent.mkdir(parents=True)
        t.queue_dir.symlink_to(victim.inbox, target_is_directory=True)
    with pytest.raises(ingest.LandingRefused, match="is a symbolic link .* never followed"):
        run(t)
    with psycopg.connect(t.database_url, autocommit=True) as conn, pytest.raises(ingest.LandingRefused):
        ingest.land_copy(conn, t, _file(tmp_path, "direct.csv", HEADER + rows(1)))
    assert theirs.is_file() and theirs.read_text() == HEADER + rows(4)  # the other party's file is where it was
    assert uploads_of(t) == [] and state(t) == (None, None, None)


@pytest.mark.parametrize(("name", "why"), [
    ("x" * 250 + ".csv", "bytes long"),
    ("bad\x01name.csv", "control characters"),
    (b"caf\xe9-latin1.csv", "not valid UTF-8"),
])
def test_an_unusable_file_name_is_quarantined_under_a_safe_name_and_the_next_upload_loads(env: dict[str, Any], tmp_path: Path, name: Any, why: str) -> None:
    t = target(env, tmp_path)
    t.inbox.mkdir(parents=True)
    raw = name if isinstance(name, bytes) else name.encode()
    with open(os.path.join(os.fsencode(t.inbox), raw), "wb") as handle:
        handle.write((HEADER + rows(3)).encode())
    run(t)
    (upload,) = uploads_of(t)
    assert upload.state == "quarantined" and why in (upload.reason or "") and upload.file_name.startswith("unusable-name-")
    assert (t.quarantine_dir / f"{upload.stored_name}.report.json").is_file()
    drop(t, "fine.csv", HEADER + rows(5))
    run(t)
    assert state(t)[1] == 5


def test_of_several_waiting_files_the_newest_is_loaded_and_the_others_are_superseded(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path)
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        landed = [ingest.land_copy(conn, t, _file(tmp_path, f"f{i}.csv", HEADER + rows(2 + i))) for i in range(4)]
    run(t)
    assert state(t)[1] == 5
    decided = {u.seq: u for u in uploads_of(t)}
    assert [decided[u.seq].state for u in landed] == ["superseded", "superseded", "superseded", "accepted"]
    assert all(f"upload #{landed[-1].seq}" in (decided[u.seq].reason or "") for u in landed[:-1])


def test_same_named_uploads_at_the_same_instant_are_all_kept(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path)
    sources = []
    for i in range(8):
        folder = tmp_path / f"party{i}"
        folder.mkdir()
        sources.append(_file(folder, "export.csv", HEADER + rows(1 + i)))
    barrier = threading.Barrier(len(sources))
    landed: list[queue.Upload] = []

    def land(source: Path) -> None:
        with psycopg.connect(t.database_url, autocommit=True) as conn:
            barrier.wait()
            landed.append(ingest.land_copy(conn, t, source))

    threads = [threading.Thread(target=land, args=(s,)) for s in sources]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({u.seq for u in landed}) == 8 and len({u.checksum for u in landed}) == 8
    assert len(list(t.queue_dir.glob("*__export.csv"))) == 8, "every same-named upload has its own file in the queue"
    run(t)
    decided = uploads_of(t)
    assert sorted(u.state for u in decided) == ["accepted"] + ["superseded"] * 7
    newest = max(landed, key=lambda u: u.seq)
    assert next(u for u in decided if u.state == "accepted").seq == newest.seq
    expected_rows = {_sha(source): 1 + i for i, source in enumerate(sources)}
    assert state(t)[1] == expected_rows[newest.checksum]



def test_a_file_sent_again_from_quarantine_carries_one_upload_number(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path)
    drop(t, "bad.csv", HEADER + "zoe@example.com,12.5,2026-03-01,middle\n")
    run(t)
    first = uploads_of(t)[-1]
    quarantined = t.quarantine_dir / first.stored_name
    assert first.state == "quarantined" and quarantined.name == f"{first.seq:08d}__bad.csv"
    assert sorted(p.name for p in t.quarantine_dir.iterdir()) == [quarantined.name, f"{quarantined.name}.report.json"]
    # The party fixes the file where it lies and moves it back into the inbox, name and all.
    quarantined.write_text(HEADER + rows(2))
    os.replace(quarantined, t.inbox / quarantined.name)
    run(t)
    again = uploads_of(t)[-1]
    assert again.seq > first.seq and again.file_name == "bad.csv" and again.state == "accepted", again
    assert [p.name for p in t.accepted_dir.iterdir()] == [f"{again.seq:08d}__bad.csv"]
    # The same through `dcr ingest` (a copy into the queue), from a copy of the accepted file.
    resent = _file(tmp_path, f"{again.seq:08d}__bad.csv", HEADER + rows(3))
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        copied = ingest.land_copy(conn, t, resent)
    assert copied.file_name == "bad.csv" and (t.queue_dir / f"{copied.seq:08d}__bad.csv").is_file()
    # A prefix that is not an earlier upload of this dataset with that name is the party's own: kept.
    drop(t, "20260301__bad.csv", HEADER + rows(4))
    run(t)
    own = uploads_of(t)[-1]
    assert own.file_name == "20260301__bad.csv" and (t.accepted_dir / f"{own.seq:08d}__20260301__bad.csv").is_file()

# --- hostile files: one line, quarantined, the next run unaffected --------------------------------------------

GOOD = HEADER + rows(6)
BIG = 5 * (1 << 20)
HOSTILE_CSV: list[tuple[str, str, bytes | None, str | None]] = [
    # (case, file name, content (None: made by the test), expected refusal (None: accepted with GOOD's rows))
    ("byte_order_mark", "bom.csv", b"\xef\xbb\xbf" + GOOD.encode(), None),
    ("crlf", "crlf.csv", GOOD.replace("\n", "\r\n").encode(), None),
    ("mixed_line_endings", "mixed.csv", "".join(line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(GOOD.splitlines())).encode(), None),
    ("cr_only", "mac.csv", GOOD.replace("\n", "\r").encode(), None),
    ("gzip", "export.csv.gz", gzip.compress(GOOD.encode()), None),
    ("zstd", "export.csv.zst", zstandard.ZstdCompressor().compress(GOOD.encode()), None),
    ("gzip_named_csv", "compressed_anyway.csv", gzip.compress(GOOD.encode()), None),
    ("latin1", "latin1.csv", (HEADER + rows(1) + "jos\u00e9@example.com,1,2026-02-01,north\n").encode("latin-1"),
     "line 3 is not valid utf-8 text (byte 0xe9); if the file is Latin-1"),
    ("huge_first_line", "huge_header.csv", b"a" * BIG + b"\n" + GOOD.encode(), "line 1 is longer than 1,048,576 characters"),
    ("huge_field", "huge_field.csv", (HEADER + rows(1) + '"' + "x" * BIG + '",1,2026-02-01,north\n').encode(), "line 3 is longer than"),
    ("empty", "empty.csv", b"", "the file is empty"),
    ("bom_only", "bom_only.csv", b"\xef\xbb\xbf\n", "the file is empty"),
    ("header_only", "header.csv", HEADER.encode(), "a header but no data rows"),
    ("header_only_crlf", "header_crlf.csv", HEADER.replace("\n", "\r\n").encode(), "a header but no data rows"),
    ("truncated_gzip", "cut.csv.gz", gzip.compress((HEADER + rows(4000)).encode())[:8000], "damaged or truncated"),
    ("ragged_row", "ragged.csv", (HEADER + rows(2) + "x@example.com,1\n").encode(), "row 3"),
    ("unterminated_quote", "quote.csv", (HEADER + rows(2) + '"x@example.com,1,2026-02-01,north\n').encode(), "unterminated CSV quoted field"),
    ("nul_byte", "nul.csv", (HEADER + rows(1)).encode() + b"a\x00b@example.com,1,2026-02-01,north\n", "row 2"),
    ("wrong_suffix", "export.xlsx", b"PK\x03\x04", "not a csv upload"),
    ("symlink", "link.csv", None, "a symbolic link"),
    ("dangling_symlink", "dangling.csv", None, "a symbolic link"),
    ("fifo", "pipe.csv", None, "a named pipe"),
    ("directory", "folder.csv", None, "a directory"),
]


def _file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """GOOD loaded the plain way: what every accepted variant must read as."""
    t = target(env, tmp_path_factory.mktemp("reference"))
    drop(t, "plain.csv", GOOD)
    run(t)
    return state(t)[1:]


@pytest.mark.parametrize(("case", "name", "content", "refusal"), HOSTILE_CSV, ids=[h[0] for h in HOSTILE_CSV])
def test_every_hostile_file_is_accepted_as_its_rows_or_quarantined_with_one_line(
    env: dict[str, Any], reference: Any, tmp_path: Path, case: str, name: str, content: bytes | None, refusal: str | None
) -> None:
    t = target(env, tmp_path / "landing")
    drop(t, "baseline.csv", HEADER + rows(2, start=100))
    run(t)
    before = state(t)
    outside = _file(tmp_path, "outside.csv", GOOD)
    if content is not None:
        drop(t, name, content)
    elif case == "symlink":
        (t.inbox / name).symlink_to(outside)
    elif case == "dangling_symlink":
        (t.inbox / name).symlink_to(tmp_path / "nowhere.csv")
    elif case == "fifo":
        os.mkfifo(t.inbox / name)
    elif case == "directory":
        (t.inbox / name).mkdir()
        _file(t.inbox / name, "inner.csv", GOOD)
    started = time.monotonic()
    outcome = run(t)
    assert time.monotonic() - started < 60
    (upload,) = [u for u in uploads_of(t) if u.file_name == name]
    if refusal is None:
        assert upload.state == "accepted", upload.reason
        assert state(t)[1:] == reference, "the variant reads as the plain file"
    else:
        assert upload.state == "quarantined", upload
        assert refusal in (upload.reason or ""), upload.reason
        assert "\n" not in (upload.reason or "") and (upload.reason or "").startswith(name), "one line, naming the file"
        assert "example.com" not in (upload.reason or ""), "a refusal never repeats a value"
        assert state(t) == before, "the current version stayed as it was"
        assert os.path.lexists(t.quarantine_dir / upload.stored_name) and (t.quarantine_dir / f"{upload.stored_name}.report.json").is_file()
        assert [u.seq for u in outcome.rejected] == [upload.seq]
    assert outside.read_text() == GOOD, "a link's target is never moved or changed"
    assert not any(os.path.lexists(p) for p in t.inbox.iterdir()), "nothing is left behind to block the next run"
    # The next upload goes through as if nothing happened.
    drop(t, "next.csv", HEADER + rows(4, start=200))
    run(t)
    assert state(t)[1] == 4


@pytest.mark.parametrize(("case", "refusal"), [
    ("latin1_declared", None),
    ("jsonl_gzip", None),
    ("jsonl_bad_line", "line 3 is not JSON"),
    ("jsonl_not_object", "line 2 is not a JSON object"),
    ("parquet_strings", None),
    ("parquet_bool_for_numeric", "column purchase_value is bool in the Parquet file, but the contract declares numeric"),
    ("parquet_int_for_date", "column purchase_date is int64 in the Parquet file, but the contract declares date"),
    ("parquet_struct_for_text", "column store_region is struct"),
    ("parquet_truncated", "not a valid Parquet file"),
])
def test_other_formats_and_encodings(env: dict[str, Any], tmp_path: Path, case: str, refusal: str | None) -> None:
    import json

    lines = [{"customer_email": f"j{i}@example.com", "purchase_value": 5 + i, "purchase_date": "2026-02-03", "store_region": "east"} for i in range(4)]
    if case == "latin1_declared":
        t = target(env, tmp_path, format=env["loaded"].collaboration.datasets["purchases"].format.model_copy(update={"encoding": "latin-1"}))
        drop(t, "latin1.csv", (HEADER + "jos\u00e9@example.com,1,2026-02-01,north\n").encode("latin-1"))
    elif case.startswith("jsonl"):
        t = target(env, tmp_path, format=env["loaded"].collaboration.datasets["purchases"].format.model_copy(update={"type": "jsonl"}))
        text = [json.dumps(r) for r in lines]
        if case == "jsonl_bad_line":
            text.insert(2, '{"customer_email": ')
        if case == "jsonl_not_object":
            text.insert(1, "[1, 2]")
        body = ("\n".join(text) + "\n").encode()
        drop(t, "export.jsonl.gz" if case == "jsonl_gzip" else "export.jsonl", gzip.compress(body) if case == "jsonl_gzip" else body)
    else:
        t = target(env, tmp_path, format=env["loaded"].collaboration.datasets["purchases"].format.model_copy(update={"type": "parquet"}))
        columns: dict[str, Any] = {k: [r[k] for r in lines] for k in lines[0]}
        if case == "parquet_bool_for_numeric":
            columns["purchase_value"] = [True] * 4
        if case == "parquet_int_for_date":
            columns["purchase_date"] = [20260203] * 4
        if case == "parquet_struct_for_text":
            columns["store_region"] = [{"a": 1}] * 4
        pq.write_table(pa.table(columns), tmp_path / "p.parquet")
        data = (tmp_path / "p.parquet").read_bytes()
        drop(t, "export.parquet", data[: len(data) // 2] if case == "parquet_truncated" else data)
    run(t)
    (upload,) = uploads_of(t)
    if refusal is None:
        assert upload.state == "accepted", upload.reason
        assert upload.row_count == (1 if case == "latin1_declared" else 4)
    else:
        assert upload.state == "quarantined" and refusal in (upload.reason or ""), upload.reason
        assert "\n" not in (upload.reason or "")


# --- duplicates, as documented: extra copies counted, keep | drop | reject ------------------------------------


def test_duplicates_count_the_extra_copies_and_keep_drop_reject_do_what_they_say(env: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(18)
    body = rows(40)
    lines = body.splitlines(keepends=True)
    copies = [rng.choice(lines) for _ in range(rng.randint(5, 15))]
    allrows = lines + copies
    rng.shuffle(allrows)
    extra = len(allrows) - len(set(allrows))
    first_seen: set[str] = set()
    repeated_at = []
    for number, line in enumerate(allrows, start=1):
        if line in first_seen:
            repeated_at.append(number)
        first_seen.add(line)
    content = HEADER + "".join(allrows)
    outcomes = {}
    for mode, limit in (("keep", 0.9), ("keep", 0.01), ("drop", 0.01), ("reject", None)):
        t = target(env, tmp_path / f"{mode}{limit}", duplicates=mode, max_duplicate_fraction=limit)
        drop(t, "dups.csv", content)
        run(t)
        (upload,) = uploads_of(t)
        outcomes[(mode, limit)] = upload
    kept = outcomes[("keep", 0.9)]
    assert kept.state == "accepted" and kept.duplicate_rows == extra and kept.row_count == len(allrows) and not kept.dropped_rows
    too_many = outcomes[("keep", 0.01)]
    assert too_many.state == "quarantined" and f"max_duplicate_fraction: {extra} row(s) broke it (rows {', '.join(map(str, repeated_at[:20]))}" in (too_many.reason or "")
    dropped = outcomes[("drop", 0.01)]
    assert dropped.state == "accepted" and dropped.row_count == len(allrows) - extra and dropped.dropped_rows == extra
    rejected = outcomes[("reject", None)]
    assert rejected.state == "quarantined" and f"{extra} row(s) repeat an earlier row exactly (rows {', '.join(map(str, repeated_at[:20]))}" in (rejected.reason or "")
    assert "duplicates: reject" in (rejected.reason or "")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_withdraw_under_duplicates_drop_records_and_reports_the_rows_the_dataset_really_has(env: dict[str, Any], tmp_path: Path, seed: int) -> None:
    """Files with repeated rows (inside a file and across files) appended under `duplicates: drop`; withdrawing one
    leaves a version whose recorded count is the count of its rows (it used to subtract a count that did not add up)."""
    rng = random.Random(seed)
    t = target(env, tmp_path, mode="append", duplicates="drop", max_duplicate_fraction=0.9)
    files = []
    for k in range(3):
        lines = rows(rng.randint(10, 30), start=rng.randint(0, 20)).splitlines(keepends=True)
        lines += [rng.choice(lines) for _ in range(rng.randint(1, 8))]
        rng.shuffle(lines)
        files.append(drop(t, f"part{k}.csv", HEADER + "".join(lines)).name)
        run(t)
    accepted = [u for u in uploads_of(t) if u.state == "accepted"]
    assert len(accepted) >= 2
    gone = rng.choice(accepted)
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        version = ingest.withdraw(conn, t, gone.seq)
        real = conn.execute(f'select count(*) from "{t.schema}"."{t.dataset}"').fetchone()[0]
    assert version.row_count == real == state(t)[1]


def test_a_database_out_of_disk_keeps_the_upload_queued_says_so_and_the_next_try_loads_it(env: dict[str, Any], tmp_path: Path,
                                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL runs out of disk while loading an upload (its tables are put on a tiny filesystem): the upload goes back
    to the queue with the reason, is never counted as an interrupted attempt (so never quarantined for it, however often
    it happens), the current data are untouched; once there is space, the same upload loads."""
    tiny = Path(f"/tmp/dcr-tiny-{uuid.uuid4().hex[:8]}")  # where the server's own user can reach it (pytest's folders are 0700)
    tiny.mkdir()
    with psycopg.connect(env["url"], autocommit=True) as conn:
        data_dir = Path(conn.execute("show data_directory").fetchone()[0])  # type: ignore[index]
        superuser = conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]  # type: ignore[index]
    if os.geteuid() != 0 or not data_dir.is_dir() or not superuser:
        tiny.rmdir()
        pytest.skip("needs root and a local database server whose login is a superuser (a tablespace on a tiny filesystem)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(tiny)], capture_output=True).returncode != 0:
        tiny.rmdir()
        pytest.skip("cannot mount a tiny tmpfs here: the database-out-of-disk path is not exercised")
    space = f"tiny_{uuid.uuid4().hex[:8]}"
    try:
        os.chown(tiny, data_dir.stat().st_uid, data_dir.stat().st_gid)
        with psycopg.connect(env["url"], autocommit=True) as conn:
            conn.execute(f"create tablespace {space} location '{tiny}'")
        t = target(env, tmp_path / "landing")
        drop(t, "small.csv", HEADER + rows(5))
        run(t)
        before = state(t)
        # Every table the ingest creates now goes to the tiny filesystem (libpq's PGOPTIONS: every connection of this process).
        monkeypatch.setenv("PGOPTIONS", f"-c default_tablespace={space}")
        full = t
        drop(full, "big.csv", HEADER + rows(40_000))
        for attempt in range(1, ingest.MAX_ATTEMPTS + 2):  # more often than the interrupted-attempts limit
            with psycopg.connect(full.database_url, autocommit=True) as conn, pytest.raises(psycopg.errors.DiskFull):
                ingest.process_queue(conn, full)
            big = next(u for u in uploads_of(t) if u.file_name == "big.csv")
            assert big.state == "queued" and big.attempts == 0, (attempt, big)
            assert "ran out of resources" in (big.reason or "") and "stays queued" in (big.reason or "")
            assert state(t) == before, "the current data are untouched"
        assert (t.queue_dir / big.stored_name).is_file(), "the file is still in the queue"
        subprocess.run(["mount", "-o", "remount,size=64m", str(tiny)], check=True)
        outcome = run(full)
        assert [u.state for u in outcome.decided if u.file_name == "big.csv"] == ["accepted"]
        assert state(t)[0] == before[0] + 1 and state(t)[1] == (before[1] + 40_000 if t.spec.mode == "append" else 40_000)
        monkeypatch.delenv("PGOPTIONS")
        with psycopg.connect(env["url"], autocommit=True) as conn:  # the tables leave the tiny filesystem before it goes
            for schema, table in conn.execute("select schemaname, tablename from pg_tables where tablespace = %s", (space,)).fetchall():
                conn.execute(f'alter table "{schema}"."{table}" set tablespace pg_default')
    finally:
        with psycopg.connect(env["url"], autocommit=True) as conn, contextlib.suppress(psycopg.Error):
            conn.execute(f"drop tablespace if exists {space}")
        subprocess.run(["umount", str(tiny)], check=False)
        tiny.rmdir()


# --- a changed contract re-checks the data already loaded ---------------------------------------------------


def test_a_tightened_contract_is_applied_to_the_current_version_and_says_which_rule_it_breaks(env: dict[str, Any], tmp_path: Path) -> None:
    collab = f"u{uuid.uuid4().hex[:10]}"
    loose = target(env, tmp_path, collab=collab)
    drop(loose, "v.csv", HEADER + rows(20, value=10))  # values 10..29
    run(loose)
    before = state(loose)
    columns = dict(loose.spec.columns)
    columns["purchase_value"] = columns["purchase_value"].model_copy(update={"range": (0, 15)})
    tight = target(env, tmp_path, collab=collab, columns=columns)
    outcome = run(tight)
    assert outcome.revalidation_failed and "expect_column_values_to_be_between on purchase_value" in outcome.revalidation_failed
    assert f"the current version {before[0]} breaks the changed contract" in outcome.revalidation_failed
    assert state(tight) == before, "the version stays (the asset's blocking check stops what reads it)"
    with psycopg.connect(tight.database_url, autocommit=True) as conn:
        assert ingest.contract_breaches(conn, collab, {"purchases": tight.spec}) == [f"purchases version {before[0]}"], "staging refuses it"
        assert ingest.contract_breaches(conn, collab, {"purchases": loose.spec}) == []
    # Re-sending the same file does not hide the breach.
    drop(tight, "v_again.csv", HEADER + rows(20, value=10))
    again = run(tight)
    assert [u.state for u in again.decided] == ["duplicate"] and again.revalidation_failed
    # A change the data meets makes a new version of the same rows, checked against the new contract.
    columns["purchase_value"] = columns["purchase_value"].model_copy(update={"range": (0, 50)})
    wider = target(env, tmp_path, collab=collab, columns=columns)
    passed = run(wider)
    assert passed.revalidated and not passed.revalidation_failed
    after = state(wider)
    assert after[0] == before[0] + 1 and after[1:] == before[1:]
    assert not run(wider).revalidated, "checked once per contract"


@pytest.mark.parametrize("change", ["withdraw", "append", "backfill"])
def test_no_change_of_an_appended_dataset_carries_its_rows_past_a_tightened_contract(env: dict[str, Any], tmp_path: Path, change: str) -> None:
    """After a tightened contract the data breaks, withdrawing one file, appending a new one or re-processing one keeps
    the breach visible: the new version is recorded against the contract its rows were all checked under, so the
    changed contract is applied again (an outside test withdrew one upload and got 1,827 rows past allowed values)."""
    collab = f"u{uuid.uuid4().hex[:10]}"
    loose = target(env, tmp_path, collab=collab, mode="append")
    drop(loose, "a.csv", HEADER + rows(10, value=10))  # values 10..19: breaks the tightened range
    run(loose)
    drop(loose, "b.csv", HEADER + rows(4, start=100, value=1))  # values 1..4: meets it
    run(loose)
    columns = dict(loose.spec.columns)
    columns["purchase_value"] = columns["purchase_value"].model_copy(update={"range": (0, 15)})
    tight = target(env, tmp_path, collab=collab, columns=columns, mode="append")
    assert run(tight).revalidation_failed
    breaking, meeting = uploads_of(tight)[:2]
    with psycopg.connect(tight.database_url, autocommit=True) as conn:
        if change == "withdraw":  # the file that meets the contract goes; the one that breaks it stays
            ingest.withdraw(conn, tight, meeting.seq)
        elif change == "backfill":  # re-processing the file that meets it must not certify the other
            ingest.reprocess(conn, tight, meeting.seq)
            with pytest.raises(ingest.UploadRejected, match="rule"):
                ingest.reprocess(conn, tight, breaking.seq)
    if change == "append":
        drop(tight, "c.csv", HEADER + rows(5, start=500, value=1))  # meets the new contract itself
    outcome = run(tight)
    assert outcome.revalidation_failed and "breaks the changed contract" in outcome.revalidation_failed, change
    with psycopg.connect(tight.database_url, autocommit=True) as conn:
        assert ingest.contract_breaches(conn, collab, {"purchases": tight.spec}), "staging must still refuse the dataset"


def test_a_file_still_being_written_is_not_claimed_until_it_settles(env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A party's upload tool writes under the final name: while it writes, a pass over the inbox leaves the file alone
    (it was once loaded with half its rows); once it has not changed for the settle interval, it is loaded whole."""
    import threading
    import time

    monkeypatch.setenv("DCR_SETTLE_SECONDS", "0.8")
    t = target(env, tmp_path)
    t.inbox.mkdir(parents=True)
    path = t.inbox / "slow.csv"
    written = threading.Event()

    def writer() -> None:
        with path.open("w") as handle:
            handle.write(HEADER)
            for n in range(12):
                handle.write(rows(10, start=10 * n))
                handle.flush()
                time.sleep(0.25)
        written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    during = run(t)
    assert not written.is_set(), "the pass must end while the file is still being written (a slower machine: raise the sleeps)"
    assert uploads_of(t) == [] and during.loaded == [] and path.is_file()
    thread.join()
    after = run(t)  # waits for the interval, then claims the whole file
    assert [u.state for u in uploads_of(t)] == ["accepted"] and state(t)[1] == 120 and after.loaded


def test_a_kept_file_changed_since_it_was_accepted_is_not_read_again(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path, mode="append")
    drop(t, "a.csv", HEADER + rows(10))
    run(t)
    (upload,) = uploads_of(t)
    kept = t.accepted_dir / upload.stored_name
    kept.write_text(HEADER + rows(10, value=999))  # swapped under the same name
    before = state(t)
    with psycopg.connect(t.database_url, autocommit=True) as conn, pytest.raises(ingest.UploadRejected, match="changed since it was accepted"):
        ingest.reprocess(conn, t, upload.seq)
    assert state(t) == before


# --- leftovers, orphaned runs ---------------------------------------------------------------------------


def test_leftover_tables_of_a_killed_load_are_dropped_at_the_next_start(env: dict[str, Any], tmp_path: Path) -> None:
    t = target(env, tmp_path)
    drop(t, "a.csv", HEADER + rows(3))
    run(t)
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        for name in ("purchases__u99999999", "purchases__u99999999__l", "purchases__v7__load", "purchases__u5_r9"):
            conn.execute(f'create table "{t.schema}"."{name}" (x int)')
    outcome = run(t)
    assert sorted(n.removeprefix("dropped leftover table ") for n in outcome.repaired if n.startswith("dropped")) == sorted(
        ["purchases__u99999999", "purchases__u99999999__l", "purchases__v7__load", "purchases__u5_r9"])
    assert state(t)[1] == 3


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED])
def test_runs_left_by_a_dead_process_are_marked_failed(runtime, status: dg.DagsterRunStatus) -> None:  # type: ignore[no-untyped-def]
    """A run left STARTED, or NOT_STARTED (its process was killed between creating and starting it), by a process of
    this host that is gone is marked failed by the next command; a live process's run is left alone."""
    instance = dg.DagsterInstance.get()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()
    runs = {}
    for label, pid in (("dead", dead.pid), ("alive", sleeper.pid)):
        run_id = str(uuid.uuid4())
        instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=status, tags={PID_TAG: str(pid), HOST_TAG: host}))
        runs[label] = run_id
    try:
        assert runs["dead"] in fail_orphaned_runs(instance)
        assert instance.get_run_by_id(runs["dead"]).status == dg.DagsterRunStatus.FAILURE  # type: ignore[union-attr]
        assert instance.get_run_by_id(runs["alive"]).status == status  # type: ignore[union-attr]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runs["alive"] in fail_orphaned_runs(instance)


# --- append mode: one partition per file, duplicates recognised, withdraw, backfill -----------------------------

IMPRESSIONS = "user_email,campaign_id,impression_time\n"


def impressions(n: int, start: int = 0) -> str:
    return IMPRESSIONS + "".join(f"v{i}@example.com,spring_sale,2026-03-{1 + i % 27:02d} 10:00:00\n" for i in range(start, start + n))


def test_appended_files_are_partitions_whose_union_is_the_dataset(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    landing = tmp_path_factory.mktemp("append_landing")
    settings = dataclasses.replace(env["runtime"].settings, policies=env["root"], landing=landing)
    ensure_development_secrets(settings.home, secret_names(settings))
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.get()
    loaded = env["loaded"]
    assert materialize(defs, [naming.grants_key("uploads")], instance=instance).success
    t = target(env, landing, "impressions", collab="uploads")
    inbox = landing / "uploads" / "ad_network" / "impressions"
    inbox.mkdir(parents=True)
    (inbox / "march.csv").write_text(impressions(30))
    (inbox / "april.csv").write_text(impressions(20, start=30))
    done = ingest_uploads(defs, loaded, landing, env["url"], instance=instance)
    assert [o.success for o in done] == [True, True], [o.failure for o in done]
    assert state(t)[1] == 50
    name = partitions_name("uploads", "ad_network", "impressions")
    files = {u.file_name: u for u in uploads_of(t)}
    assert set(instance.get_dynamic_partitions(name)) == {files["march.csv"].partition_key, files["april.csv"].partition_key}
    key = dg.AssetKey(naming.raw_key("uploads", "impressions"))
    by_partition = {e.partition: e.metadata["file_name"].value for e in _materializations(instance, key)}  # type: ignore[attr-defined]
    assert by_partition == {files["march.csv"].partition_key: "march.csv", files["april.csv"].partition_key: "april.csv"}
    # The same file again adds nothing; a new month adds its rows.
    (inbox / "march_again.csv").write_text(impressions(30))
    (inbox / "may.csv").write_text(impressions(5, start=50))
    again = ingest_uploads(defs, loaded, landing, env["url"], instance=instance)
    assert [o.success for o in again] == [True, True], "a file already appended is not a failure"
    assert next(u for u in uploads_of(t) if u.file_name == "march_again.csv").state == "duplicate"
    assert state(t)[1] == 55
    # A backfill of one partition re-processes that file: a new version, the same rows.
    version = state(t)[0]
    backfill = materialize(defs, [naming.raw_key("uploads", "impressions")], instance=instance, partition_key=files["march.csv"].partition_key)
    assert backfill.success, backfill.failure
    assert state(t)[0] == version + 1 and state(t)[1] == 55
    # Withdrawing a file (`dcr uploads withdraw`) removes exactly its rows; the event log records it as a materialization
    # of the file's partition whose data version is the dataset's new content (what staging's provenance is compared
    # with), then the partition goes.
    proc = subprocess.run([sys.executable, "-m", "dcr_pipelines.cli", "uploads", "withdraw", "uploads", "ad_network", "impressions",
                           str(files["april.csv"].seq)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DCR_POLICIES": str(env["root"]), "DCR_LANDING": str(landing)})
    assert proc.returncode == 0, proc.stderr
    assert f"upload #{files['april.csv'].seq} withdrawn" in proc.stdout and "35 rows" in proc.stdout, proc.stdout
    with psycopg.connect(env["url"], autocommit=True) as conn:
        emails = {r[0] for r in conn.execute(f'select user_email from "{t.schema}".impressions').fetchall()}
        checksum = conn.execute("select checksum from dcr_meta.dataset_versions where collaboration = 'uploads' and dataset = 'impressions' "
                                "and is_current").fetchone()[0]
    assert emails == {f"v{i}@example.com" for i in [*range(30), *range(50, 55)]}
    assert next(u for u in uploads_of(t) if u.file_name == "april.csv").state == "withdrawn"
    latest = instance.get_latest_data_version_record(key, False)
    assert latest.partition_key == files["april.csv"].partition_key and latest.event_log_entry.tags["dagster/data_version"] == checksum
    assert latest.event_log_entry.asset_materialization.metadata["party"].value == "ad_network"  # whose history it is, for the audit
    assert files["april.csv"].partition_key not in instance.get_dynamic_partitions(name)
    # The rest of the pipeline reads the union: a collaboration run leaves the partitioned dataset to its own runs.
    from dcr_pipelines.runner import collaboration_keys

    assert ["uploads", "raw", "raw_impressions"] not in collaboration_keys(defs, "uploads")


def _materializations(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[Any]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100).records
    return [r.asset_materialization for r in records if r.asset_materialization is not None]


# --- kill -9 at random instants: nothing lost, nothing loaded twice, nothing stale ------------------------------------

KILLED_INGEST = textwrap.dedent("""
    # A worker: imports once, then forks one ingest per line of stdin (the test kills the child at a random instant).
    import os, sys
    from pathlib import Path
    import great_expectations  # noqa: F401
    import psycopg
    from dcr_pipelines.lib import naming
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.services import ingest
    folder, collab, landing, url = sys.argv[1:5]
    ds = load_collaboration(Path(folder)).collaboration.datasets["purchases"].model_copy(update={"max_duplicate_fraction": None})
    t = ingest.Target(collab, ds.owner, "purchases", ds, naming.raw_schema(collab, ds.owner), Path(landing), url)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            with psycopg.connect(url, autocommit=True) as conn:
                ingest.land_copy(conn, t, Path(line.strip()))
                ingest.process_queue(conn, t)
            os._exit(0)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) else "finished", flush=True)
""")


def test_ingests_killed_at_random_instants_lose_nothing_load_nothing_twice_and_never_roll_back(env: dict[str, Any], tmp_path: Path) -> None:
    """Uploads of growing files, each killed (SIGKILL) at a random instant of landing, loading, validating or swapping,
    until 20 were killed before they finished (at most 48: a fast machine finishes more of them before the kill);
    after each, the next start's pass must leave every upload decided and the dataset at the newest accepted file."""
    rng = random.Random(1806)
    collab = f"u{uuid.uuid4().hex[:10]}"
    t = target(env, tmp_path / "landing", collab=collab, max_duplicate_fraction=None)
    script = tmp_path / "killed_ingest.py"
    script.write_text(KILLED_INGEST)
    worker = subprocess.Popen([sys.executable, str(script), str(env["root"] / "uploads"), collab, str(t.landing), t.database_url],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    sizes: dict[str, int] = {}
    seen: dict[str, int] = {}
    killed = 0
    try:
        for attempt in range(48):
            if killed >= 20:
                break
            n = 2000 + attempt
            source = _file(tmp_path, f"export{attempt}.csv", HEADER + rows(n))
            sizes[_sha(source)] = n
            worker.stdin.write(f"{source}\n")
            worker.stdin.flush()
            child = int(worker.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.02) if attempt % 4 == 0 else rng.uniform(0.0, 0.4))  # some in the copy, most in the load
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            killed += worker.stdout.readline().strip() == "killed"
            landed = [u for u in uploads_of(t) if u.file_name == source.name]
            where = landed[0].state if landed else ("copy left" if list(t.queue_dir.glob(f".*{source.name}*")) else "not landed")
            seen[where] = seen.get(where, 0) + 1
            run(t)  # the next start: repairs, then decides whatever waits
            _check_invariants(t, sizes)
    finally:
        worker.stdin.close()
        worker.wait(timeout=30)
    assert killed >= 20, f"only {killed} of {sum(seen.values())} ingests were killed before they finished ({seen})"
    assert seen.get("processing", 0) >= 10 and {"not landed", "copy left", "queued"} & set(seen), f"the kills did not spread over the steps: {seen}"
    print(f"where the kills landed: {seen}")


def _check_invariants(t: ingest.Target, sizes: dict[str, int]) -> None:
    decided = uploads_of(t)
    assert not [u for u in decided if u.state in ("queued", "processing")], "an upload was left undecided"
    for u in decided:  # each file is in exactly the place its state says
        places = [os.path.lexists(d / u.stored_name) for d in (t.queue_dir, t.accepted_dir, t.quarantine_dir)]
        if u.state in ("queued", "processing"):
            assert places == [True, False, False], (u, places)
        elif u.state == "accepted":
            assert places == [False, True, False], (u, places)
        else:
            assert places[0] is False and places[2] is True, (u, places)
    accepted = [u for u in decided if u.state == "accepted"]
    with psycopg.connect(t.database_url, autocommit=True) as conn:
        current = ingest.current_version(conn, t)
        loads = conn.execute("select upload_seq, count(*) from dcr_meta.dataset_versions where collaboration = %s group by 1 having count(*) > 1",
                             (t.collaboration,)).fetchall()
        tables = {r[0] for r in conn.execute("select table_name from information_schema.tables where table_schema = %s and table_type = 'BASE TABLE'",
                                             (t.schema,)).fetchall()}
        kept = set()
        for (parts,) in conn.execute("select parts from dcr_meta.dataset_versions where collaboration = %s order by version desc limit %s",
                                     (t.collaboration, ingest.KEEP_VERSIONS)).fetchall():
            kept.update(parts)
        count = conn.execute(f'select count(*) from "{t.schema}".purchases').fetchone()[0] if current else 0
    assert not loads, f"an upload was loaded twice: {loads}"
    assert tables <= kept, f"leftover tables: {tables - kept}"
    if not accepted:
        return
    newest = max(accepted, key=lambda u: u.seq)
    assert current is not None and current.upload_seq == newest.seq, "the dataset is not at the newest accepted upload"
    assert current.row_count == count == sizes[newest.checksum], "the current version is incomplete"  # type: ignore[index]
