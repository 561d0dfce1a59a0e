"""A running `dcr ui` reloads its code location when the policies folder changes: a new collaboration folder, an
edited query or an approval shows in the UI within seconds, without "Reload definitions" (the code location builds its
assets from the policies when it loads, so only a reload can show a change).

A thread polls the folder's files (name, size, modification time) every ``interval`` seconds and, on a change, asks the
webserver to reload the location through Dagster's GraphQL client. A reload that fails (the UI still starting) is
tried again at the next poll. A broken policy loads as its broken-policy sensor (see definitions.py), as at start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

LOCATION = "dcr_pipelines"  # [tool.dg.project] code_location_name in pyproject.toml, and workspace.yaml's location_name


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``folder``: relative path, size and modification time (what an edit, an add or a removal changes)."""
    seen = []
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                seen.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
        except OSError:  # removed while we looked: the next poll sees the folder without it
            continue
    return tuple(sorted(seen))


def reload_location(host: str, port: int, location: str = LOCATION) -> bool:
    """Ask the webserver at host:port to reload ``location``; whether it did."""
    from dagster_graphql import DagsterGraphQLClient, ReloadRepositoryLocationStatus

    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a wildcard address is reached on loopback)
    try:
        info = DagsterGraphQLClient(client_host, port_number=port, timeout=120).reload_repository_location(location)
    except Exception:  # (the UI still starting, or busy: tried again at the next poll; never a traceback in the terminal)
        return False
    return info.status == ReloadRepositoryLocationStatus.SUCCESS


def watch(folder: Path, host: str, port: int, interval: float = 2.0,
          reload: Callable[[str, int], bool] = reload_location) -> threading.Event:
    """Start the polling thread (a daemon: it ends with the process); set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        current = fingerprint(folder) if folder.is_dir() else ()
        pending = False
        while not stop.wait(interval):
            now = fingerprint(folder) if folder.is_dir() else ()
            if now != current:
                current, pending = now, True
            if pending and reload(host, port):
                pending = False

    threading.Thread(target=loop, name="dcr-ui-policy-reload", daemon=True).start()
    return stop
