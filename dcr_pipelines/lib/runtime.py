"""Bring a deployment up: database, environment for dbt and Dagster, development secrets.

Every entry point (the ``dcr`` command, ``definitions.py``, the tests) calls
``activate()`` once; it is idempotent and cheap when already active.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from .database import DAGSTER_DB, WAREHOUSE_DB, Connection, check_reachable, ensure_database, start_embedded
from .settings import PROJECT_ROOT, Settings

SECRET_PREFIX = "DCR_SECRET__"  # noqa: S105 (the prefix of variable names, not a secret)


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    warehouse: Connection
    dagster_url: str
    embedded: bool


def secret_env_name(*parts: str) -> str:
    """Environment variable holding a secret, e.g. DCR_SECRET__HMAC__DEMO__RETAILER."""
    return SECRET_PREFIX + "__".join(p.upper() for p in parts)


def activate(settings: Settings | None = None) -> Runtime:
    """Start or reach the database and export what dbt, Dagster and the resources read."""
    settings = settings or Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.external_database_url:
        warehouse = Connection.from_url(settings.external_database_url)
        dagster_url = os.environ.get("DCR_DAGSTER_DATABASE_URL") or warehouse.url()
        embedded = False
        check_reachable(warehouse)  # one line within seconds, not Dagster's minute of retries and a traceback
        if dagster_url != warehouse.url():
            check_reachable(Connection.from_url(dagster_url), "DCR_DAGSTER_DATABASE_URL")
    else:
        admin = start_embedded(settings.home)
        ensure_database(admin, WAREHOUSE_DB)
        ensure_database(admin, DAGSTER_DB)
        warehouse = replace(admin, dbname=WAREHOUSE_DB)
        dagster_url = admin.url(DAGSTER_DB)
        embedded = True

    dagster_home = settings.home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    write_if_changed(dagster_home / "dagster.yaml", (PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8"))
    # Dagster's first-visit newsletter dialog would cover the asset graph; record it as seen.
    (dagster_home / ".nux").mkdir(exist_ok=True)
    write_if_changed(dagster_home / ".nux" / "nux.yaml", "seen: 1\n")
    os.environ.update(
        {
            "DCR_HOME": str(settings.home),
            "DCR_POLICIES": str(settings.policies),
            "DCR_LANDING": str(settings.landing),
            "DCR_WAREHOUSE_URL": warehouse.url(),
            "DCR_PG_HOST": warehouse.host,
            "DCR_PG_PORT": str(warehouse.port),
            "DCR_PG_USER": warehouse.user,
            "DCR_PG_DBNAME": warehouse.dbname,
            "DBT_ENV_SECRET_PG_PASSWORD": warehouse.password,
            "DAGSTER_HOME": str(dagster_home),
            "DBT_PROFILES_DIR": str(settings.dbt_source),  # the checkout's profiles.yml (read only); runs pass their project's own
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
    )
    if development_secrets_allowed(embedded):
        _load_development_secrets(settings.home / "secrets.env")
    global _ACTIVE, _ACTIVE_FROM
    _ACTIVE = Runtime(settings, warehouse, dagster_url, embedded)
    _ACTIVE_FROM = (settings, os.environ.get("DCR_DAGSTER_DATABASE_URL"))
    return _ACTIVE


_ACTIVE: Runtime | None = None  # what this process's last activate() found and exported
_ACTIVE_FROM: tuple[Settings, str | None] | None = None  # and the environment it was found from


def current() -> Runtime:
    """The runtime this process already activated, while its settings are still the environment's and its embedded
    server still runs; otherwise :func:`activate`. What Dagster's storage classes ask for: settings are read, the
    server reached and the environment exported once per process, not once per storage."""
    active = _ACTIVE
    if active is None or (Settings.from_env(), os.environ.get("DCR_DAGSTER_DATABASE_URL")) != _ACTIVE_FROM:
        return activate()
    if active.embedded and not _server_alive(active.settings.home):
        return activate()
    return active


def _server_alive(home: Path) -> bool:
    try:
        pid = int((home / "pg" / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if it differs, and atomically (a temporary file renamed over it): a process that
    reads the file while another command starts never sees it empty or half written (a half-written dagster.yaml sent
    a run to a stray SQLite storage)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


DOTENV_KEYS = ("DCR_HOME", "DAGSTER_HOME")


def record_in_dotenv(settings: Settings, root: Path = PROJECT_ROOT) -> Path | None:
    """Name the deployment in the checkout's ``.env`` (git ignores it), where Dagster's own tools read it.

    ``dg dev``, ``dg list defs`` and ``dagster asset materialize`` run from the repository
    root then use this deployment's ``DAGSTER_HOME``. Only a deployment whose home is inside
    the checkout is recorded (a test's or another checkout's is not); other lines are kept.
    """
    home = settings.home.resolve()
    if not home.is_relative_to(root.resolve()) or not (root / "pyproject.toml").is_file():
        return None
    path = root / ".env"
    wanted = {"DCR_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    kept = [line for line in lines if line.split("=", 1)[0].strip() not in DOTENV_KEYS]
    text = "\n".join([*kept, *(f"{k}={v}" for k, v in wanted.items())]) + "\n"
    write_if_changed(path, text)
    return path


def development_secrets_allowed(embedded: bool) -> bool:
    """Secrets from the throw-away file under DCR_HOME: on the embedded database, or when DCR_DEV_SECRETS=1 asks for them.

    With an external database, secrets come from the environment only: a file
    left by an earlier embedded run must not silently become a real deployment's keys.
    """
    return embedded or os.environ.get("DCR_DEV_SECRETS") == "1"


def missing_secrets(names: list[str]) -> list[str]:
    return [n for n in names if not os.environ.get(n)]


def ensure_development_secrets(home: Path, names: list[str]) -> None:
    """Give every named secret a random value in ``home/secrets.env`` unless the environment has one.

    Production deployments set the variables themselves (a secret manager);
    this file exists so that ``make demo`` works on a fresh clone. It lives
    under ``.dcr/``, which git ignores.
    """
    path = home / "secrets.env"
    current = _read_env_file(path)
    missing = [n for n in names if n not in current and n not in os.environ]
    if missing:
        current.update({n: secrets.token_hex(32) for n in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{k}={v}\n" for k, v in sorted(current.items())))
    _load_development_secrets(path)


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _load_development_secrets(path: Path) -> None:
    for key, value in _read_env_file(path).items():
        os.environ.setdefault(key, value)
