"""`make ui` stops every process the Dagster UI started within 10 seconds: when make itself is sent SIGTERM (its recipe's
process is left running, so `dcr ui` learns of it from the kernel: its parent died), and on Ctrl-C at a terminal (SIGINT
to the foreground process group). A shell stands in for make: it runs `dcr ui` as a child, as make's recipe does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ended(process: psutil.Process) -> bool:
    """Exited (a zombie has exited: in a container nothing may read its status)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["SIGTERM to make", "Ctrl-C"])
def test_the_ui_and_every_process_it_started_are_gone_within_10_seconds(tmp_path: Path, how: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_", "DBT_", "PG"))}
    env.update({"DCR_HOME": str(tmp_path / "home"), "DCR_LANDING": str(tmp_path / "landing")})
    port = _free_port()
    make = subprocess.Popen(["sh", "-c", '"$@"; true', "make", *DCR, "ui", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _listening(port):
            assert make.poll() is None, "dcr ui ended before the UI was up"
            time.sleep(1)
        assert _listening(port), "the UI did not come up in 5 minutes"
        time.sleep(3)  # the daemon and the code server
        tree = psutil.Process(make.pid).children(recursive=True)
        assert len(tree) >= 4, [p.cmdline() for p in tree]  # dcr ui, dg dev, the webserver, the daemon, code servers
        started = time.monotonic()
        if how == "Ctrl-C":
            os.killpg(make.pid, signal.SIGINT)
        else:
            make.send_signal(signal.SIGTERM)
        make.wait(timeout=15)
        while (alive := [p for p in tree if not _ended(p)]) and time.monotonic() - started < 10:
            time.sleep(0.2)
        assert not alive, [p.pid for p in alive]
        assert time.monotonic() - started < 10.5
        assert not _listening(port)
    finally:
        for process in tree:
            if not _ended(process):
                process.kill()
        subprocess.run([*DCR, "db", "stop"], env=env, capture_output=True, timeout=120)
