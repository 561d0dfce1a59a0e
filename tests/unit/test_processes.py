"""PSI workers die with the process that started them: a killed run leaves no process holding a party's key."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

POOL = """
from dcr_pipelines.lib.processes import map_chunks, worker_pool
from dcr_pipelines.lib.psi import blind, new_key
with worker_pool(2) as pool:
    print("ready", flush=True)
    map_chunks(pool, blind, new_key(), [f"p{i}@example.com" for i in range(400_000)], 2)
"""

LANES = """
from dcr_pipelines.lib.matching import PartyInput, match
ids = [f"p{i}@example.com" for i in range(400_000)]
print("ready", flush=True)
match([PartyInput("a", ids, ids), PartyInput("b", ids, ids)], "a", buckets=2, workers=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", [POOL, LANES], ids=["epoch_pool", "matching_lanes"])
def test_workers_die_when_the_run_is_killed(script: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    workers: list[psutil.Process] = []
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
        time.sleep(0.1)
    assert len(workers) >= 2, "the workers did not start"
    time.sleep(1.0)  # at work
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} worker(s) outlived the killed run"
