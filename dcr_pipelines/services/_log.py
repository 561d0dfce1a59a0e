"""What a service logs to: a Dagster step's ``context.log`` in the assets, anything with these three methods elsewhere."""

from __future__ import annotations

from typing import Protocol


class Log(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...

    def error(self, msg: str) -> None: ...
