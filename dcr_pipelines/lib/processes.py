"""Worker processes that die with the process that started them.

A PSI worker holds a party's key and identifiers. If the run's process is
killed (``kill -9``, an OOM kill, a lost container), a plain child keeps
running, and keeps them in memory. On Linux each worker asks the kernel to
send it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then checks that
the parent did not die before the request took. Elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Call first thing in a child started by process ``parent`` (``sig``: what the kernel sends when it dies)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent is already gone: do not start work nobody waits for
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that die with this one."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=die_with_parent, initargs=(os.getpid(),))


def map_chunks(pool: ProcessPoolExecutor | None, fn: Callable[[bytes, Sequence[Any]], list[bytes]], key: bytes, items: Sequence[Any],
               parts: int) -> list[bytes]:
    """``fn(key, items)`` computed in ``parts`` chunks on ``pool`` (here, without one), results in input order."""
    if not items:
        return []
    if pool is None or parts <= 1:
        return list(fn(key, items))
    size = -(-len(items) // parts)
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    out: list[bytes] = []
    for part in pool.map(fn, [key] * len(chunks), chunks):
        out.extend(part)
    return out


class _Stop(Exception):
    pass


def _ended(process: Any) -> bool:
    """Whether a psutil process has exited (a zombie has: it only waits for its parent to read its status)."""
    import psutil

    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def run_process_tree(argv: Sequence[str], grace: float = 8.0) -> int:
    """Run ``argv`` (a server that starts servers: ``dg dev``) in its own session and wait for it. SIGINT, SIGTERM or
    SIGHUP to this process, or its parent dying (``make ui`` stopped), stop the whole tree: SIGTERM to every
    descendant, then SIGKILL to whatever is left after ``grace`` seconds. Returns the child's exit code."""
    import subprocess
    import time

    import psutil

    die_with_parent(os.getppid(), signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        raise _Stop(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    child = subprocess.Popen(list(argv), start_new_session=True)
    try:
        return child.wait()
    except _Stop:
        return 0
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        deadline = time.monotonic() + grace
        child_gone = False
        while (alive := [p for p in tree if not _ended(p)]) and time.monotonic() < deadline:
            if not child_gone and child.poll() is not None:  # reap ours; the others' zombies are their parents' (or init's)
                child_gone = True
            time.sleep(0.1)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        child.poll()
        for s, handler in previous.items():
            signal.signal(s, handler)
