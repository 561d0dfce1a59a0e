"""Worker processes that die with the process that started them.

A PSI worker holds a party's key and identifiers. If the run's process is
killed (``kill -9``, an OOM kill, a lost container), a plain child keeps
running, and keeps them in memory. On Linux each worker asks the kernel to
send it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then checks that
the parent did not die before the request took. Elsewhere this does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Call first thing in a child started by process ``parent``."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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
