"""The Dagster instance's storage: the deployment's own PostgreSQL, found the way every `dcr` command finds it.

``dagster.yaml`` names these classes instead of a ``postgres_url`` read from an
environment variable, so Dagster's own tools (``dg dev``, ``dg list defs``, ``dagster
asset materialize``) work from the repository root with nothing exported: the embedded
server is started if it is not running, or ``DCR_DATABASE_URL`` (and
``DCR_DAGSTER_DATABASE_URL``) name the external one, exactly as for ``dcr``. Each class is
dagster-postgres's own storage; only where its URL comes from differs.
"""

from typing import Any

from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from ..lib.runtime import current


class _DeploymentURL:
    """No configuration: the URL is the deployment's (dagster-postgres is written for psycopg2; SQLAlchemy 2.1 would pick psycopg 3)."""

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> Any:
        url = current().dagster_url.replace("postgresql://", "postgresql+psycopg2://", 1)
        return cls(postgres_url=url, inst_data=inst_data)  # type: ignore[call-arg]


class DeploymentRunStorage(_DeploymentURL, PostgresRunStorage):
    """Runs and their tags."""


class DeploymentEventLogStorage(_DeploymentURL, PostgresEventLogStorage):
    """The event log: materializations, observations, check results (the audit trail reads it)."""


class DeploymentScheduleStorage(_DeploymentURL, PostgresScheduleStorage):
    """Schedule and sensor state (ticks, cursors)."""
