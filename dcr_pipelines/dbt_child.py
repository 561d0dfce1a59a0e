"""``dcr-dbt``: dbt, started so that it dies with the process that started it.

Dagster's dbt resource starts ``dbt`` as a child process. If the run's
process is killed (``kill -9``, an OOM kill, a lost container), a plain child
keeps running and writing to the warehouse. This wrapper asks Linux to send
it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``, kept across ``exec``),
checks that the parent did not die before the request took, then becomes the
real ``dbt`` beside this interpreter. Elsewhere it just runs dbt.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent is already gone: do not start work nobody waits for
            os._exit(1)
    dbt = Path(sys.executable).with_name("dbt")
    os.execv(dbt, [str(dbt), *sys.argv[1:]])  # noqa: S606 (our own dbt, arguments from dagster-dbt)


if __name__ == "__main__":
    main()
