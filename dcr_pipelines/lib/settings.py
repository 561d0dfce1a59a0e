"""Where things live: read from the environment when called, never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The repository checkout this package runs from (installed editable by `make`).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """Paths and connection settings of one clean-room deployment."""

    home: Path
    policies: Path
    landing: Path
    dbt_project: Path  # where the deployment keeps its dbt projects, one per policies folder (see defs/dbt_project.py)
    external_database_url: str | None
    dbt_source: Path = PROJECT_ROOT / "dbt_project"  # the checkout's hand-written part (macros, dbt_project.yml), never written

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("DCR_HOME", PROJECT_ROOT / ".dcr")).resolve()
        return cls(
            home=home,
            policies=Path(os.environ.get("DCR_POLICIES", PROJECT_ROOT / "policies")).resolve(),
            landing=Path(os.environ.get("DCR_LANDING", home / "landing")).resolve(),
            dbt_project=home / "dbt",
            external_database_url=os.environ.get("DCR_DATABASE_URL") or None,
        )

    @property
    def exports(self) -> Path:
        return self.home / "exports"
