"""A killed `dcr run` leaves no dbt writing and no run STARTED; the CLI's upload errors, and the infrastructure's, are one line."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dcr_pipelines.lib import demo_data

from .conftest import make_collaboration

pytestmark = pytest.mark.slow
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
C = "killrun"


@pytest.fixture(scope="module")
def killrun(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("killrun_policies")
    make_collaboration(root, C, groups=3)
    landing = tmp_path_factory.mktemp("killrun_landing")
    demo_data.generate(landing / C, rows=3000, overlap=0.3, seed=5)
    env = {**os.environ, "DCR_POLICIES": str(root), "DCR_LANDING": str(landing)}
    return {"env": env, "landing": landing, "tmp": tmp_path_factory.mktemp("killrun_files")}


def dcr(ctx: dict[str, Any], *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=timeout, env=env or ctx["env"])


def _dbt_sessions() -> set[int]:
    """Backends of the warehouse working for dbt (its connections name themselves ``dbt``) on this test's collaboration."""
    with psycopg.connect(os.environ["DCR_WAREHOUSE_URL"], autocommit=True) as conn:
        rows = conn.execute("select pid from pg_stat_activity where application_name = 'dbt' and datname = current_database()"
                            " and state = 'active' and query ilike %s", (f"%{C}%",)).fetchall()
    return {r[0] for r in rows}


def _alive(pids: set[int]) -> set[int]:
    with psycopg.connect(os.environ["DCR_WAREHOUSE_URL"], autocommit=True) as conn:
        rows = conn.execute("select pid from pg_stat_activity where pid = any(%s)", (list(pids),)).fetchall()
    return {r[0] for r in rows}


def test_a_run_killed_while_dbt_works_leaves_no_dbt_statement_running_and_is_marked_failed_at_the_next_start(killrun: dict[str, Any]) -> None:
    """dbt runs inside the run's process: killing it kills dbt; the server cancels the dead client's statements
    (client_connection_check_interval) instead of running them to the end, so nothing of it commits later."""
    rng = random.Random(5)
    for _ in range(2):
        proc = subprocess.Popen([*DCR, "run", C], env=killrun["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        sessions: set[int] = set()
        while not sessions and time.monotonic() < deadline and proc.poll() is None:
            sessions = _dbt_sessions()
            time.sleep(0.02)
        assert sessions, "the run finished or failed before dbt started a statement"
        time.sleep(rng.uniform(0.0, 0.3))
        sessions |= _dbt_sessions()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(sessions), "dbt's statements outlived the run that started them"
    done = dcr(killrun, "run", C, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "was left unfinished by a process that died; marked failed" in done.stderr


CSV = "customer_email,purchase_value,purchase_date,store_region\n"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["ingest", "killrun/../killrun", "retailer", "purchases", "{good}"], 2, "is not a collaboration name"),
    (["ingest", C, "../retailer", "purchases", "{good}"], 2, "belongs to retailer, not '../retailer'"),
    (["ingest", C, "retailer", "../../purchases", "{good}"], 2, "declares no dataset '../../purchases'"),
    (["ingest", C, "retailer", "purchases", "{tmp}"], 2, "not a regular file"),
    (["ingest", C, "retailer", "purchases", "{tmp}/missing.csv"], 2, "no such file"),
    (["ingest", C, "retailer", "purchases", "{bad}"], 1, "quarantined: bad.csv: missing column(s) store_region"),
    (["uploads", "withdraw", C, "retailer", "purchases", "1"], 2, "replace mode: upload a corrected file instead"),
], ids=["traversal_collab", "traversal_party", "traversal_dataset", "directory", "missing", "bad_file", "withdraw_replace"])
def test_upload_mistakes_are_one_error_line_and_touch_nothing_outside_the_landing_tree(killrun: dict[str, Any], args: list[str], code: int, message: str) -> None:
    tmp: Path = killrun["tmp"]
    (tmp / "good.csv").write_text(CSV + "a@example.com,1,2026-02-01,north\n")
    (tmp / "bad.csv").write_text("customer_email,purchase_value,purchase_date\na@example.com,1,2026-02-01\n")
    before = sorted(str(p) for p in Path(killrun["landing"]).parent.rglob("*") if "killrun" in str(p))
    started = time.monotonic()
    proc = dcr(killrun, *[a.format(good=tmp / "good.csv", bad=tmp / "bad.csv", tmp=tmp) for a in args])
    assert time.monotonic() - started < 60
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    if code == 2:
        after = sorted(str(p) for p in Path(killrun["landing"]).parent.rglob("*") if "killrun" in str(p))
        assert after == before, "a refused command changed the landing tree"


def test_unreachable_and_missing_databases_are_one_line_within_ten_seconds(killrun: dict[str, Any]) -> None:
    for url, message in (("postgresql://postgres@127.0.0.1:1/x", "Connection refused; start the database server at 127.0.0.1:1"),):
        started = time.monotonic()
        proc = dcr(killrun, "ingest", C, "retailer", "purchases", str(killrun["tmp"]), env={**killrun["env"], "DCR_DATABASE_URL": url})
        assert time.monotonic() - started < 10
        assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_a_missing_external_database_is_one_line_within_ten_seconds(killrun: dict[str, Any]) -> None:
    import psycopg

    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (the development and CI machines run one)")
    started = time.monotonic()
    proc = dcr(killrun, "budget", C, env={**killrun["env"], "DCR_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/dcr_no_such_database"})
    assert time.monotonic() - started < 10
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1
    assert 'database "dcr_no_such_database" does not exist; create it (createdb' in proc.stderr, proc.stderr


def test_a_full_landing_disk_is_one_line_nothing_is_queued_and_the_next_try_works(killrun: dict[str, Any], tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tiny tmpfs here (needs root): the full-disk path is not exercised")
    try:
        big = tmp_path / "big.csv"
        big.write_text(CSV + "".join(f"f{i}@example.com,{i % 90},2026-02-01,north\n" for i in range(6000)))
        proc = dcr(killrun, "ingest", C, "retailer", "purchases", str(big), env={**killrun["env"], "DCR_LANDING": str(tiny)})
        assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr
        assert "No space left on device; nothing was queued" in proc.stderr
        assert not [p for p in tiny.rglob("*") if p.is_file()], "a partial copy was left in the queue"
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
    proc = dcr(killrun, "ingest", C, "retailer", "purchases", str(big))
    assert proc.returncode == 0 and "accepted as version" in proc.stdout, proc.stderr


def test_a_database_lost_mid_command_is_one_line_exit_3_and_the_command_can_be_repeated(tmp_path: Path) -> None:
    """The embedded server stops while `dcr demo` runs its pipeline (a deployment of its own, so nothing else is
    touched): one `error:` line, exit 3 (the infrastructure), no traceback and no Dagster retry noise; the same command
    then runs to the end."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("DCR_DATABASE_URL", "DCR_LANDING", "DAGSTER_HOME", "DCR_WAREHOUSE_URL")},
           "DCR_HOME": str(tmp_path / "home")}
    demo = subprocess.Popen([*DCR, "demo", "--rows", "2000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    socket_dir = tmp_path / "home" / "pg"
    deadline = time.monotonic() + 240
    started = False
    while time.monotonic() < deadline and demo.poll() is None and not started:
        time.sleep(0.5)
        try:
            with psycopg.connect(f"postgresql://postgres@/dagster?host={socket_dir}&port=5432", connect_timeout=2) as conn:
                started = conn.execute("select count(*) from runs where status = 'STARTED'").fetchone()[0] > 0  # type: ignore[index]
        except psycopg.Error:
            continue
    assert started and demo.poll() is None, "the demo must be inside a run when the server stops"
    stop = subprocess.run([*DCR, "db", "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    out, err = demo.communicate(timeout=300)
    assert demo.returncode == 3, (out[-2000:], err[-3000:])
    assert err.count("\n") == 1 and err.startswith("error: the connection to the database was lost during the command"), err[-3000:]
    again = subprocess.run([*DCR, "demo", "--rows", "2000"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    subprocess.run([*DCR, "db", "stop"], env=env, capture_output=True, text=True, timeout=120)


def test_uploads_list_shows_each_datasets_current_version_and_whether_answers_read_it_yet(killrun: dict[str, Any]) -> None:
    """A new upload makes a version the staged data do not hold yet: `dcr uploads list` says so (and that answers refuse
    until `dcr run`), with the version's real row count; after the run it says the staged data are that version."""
    assert dcr(killrun, "run", C, timeout=600).returncode == 0  # whatever waits in the landing folder is in
    big = killrun["tmp"] / "listed.csv"
    big.write_text(CSV + "".join(f"l{i}@example.com,{i % 90},2026-02-01,north\n" for i in range(321)))
    proc = dcr(killrun, "ingest", C, "retailer", "purchases", str(big))
    assert proc.returncode == 0, proc.stderr
    listed = dcr(killrun, "uploads", "list", C, "--dataset", "purchases")
    assert listed.returncode == 0, listed.stderr
    current = listed.stdout.split("current data", 1)[1]
    line = next(x for x in current.splitlines() if "retailer/purchases" in x)
    assert " 321 " in line and "not yet" in line and f"dcr run {C}" in current, listed.stdout
    assert dcr(killrun, "run", C, timeout=600).returncode == 0
    listed = dcr(killrun, "uploads", "list", C)
    current = listed.stdout.split("current data", 1)[1]
    assert "not yet" not in current and current.count(" yes") == 3, listed.stdout
