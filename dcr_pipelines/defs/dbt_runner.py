"""dbt in the run's own process (dbt's ``dbtRunner``), not a ``dbt`` child per stage.

A child costs its start, dbt's imports and a parse (about three seconds of
every stage at 100k rows, more than the SQL). Here dbt is imported once per
process, the project is parsed once per manifest (partial parsing, under the
project's prepare lock) and every build reuses the parsed manifest. dbt's
result events are turned into Dagster events by dagster-dbt's own converter,
so the assets, checks and metadata are those of a ``dbt build`` child.

dbt is not re-entrant: one invocation at a time per process (a lock). Every
build logs in as the collaboration's builder (``store.builder``: not a
superuser, owns only that collaboration's models); for the invocation, under
that lock, the process environment holds that login and none of the
deployment's secrets (keys, the operator's database URLs), so nothing dbt or a
model could read names a key. Every dbt connection asks the server to check
every two seconds that its client is still there
(``client_connection_check_interval``): a killed run's statements are
cancelled on the server instead of running on, uncommitted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ..lib.runtime import SECRET_PREFIX
from ..store.builder import Login

_LOCK = threading.Lock()
_PARSED: dict[tuple[str, str], Any] = {}  # (project dir, manifest stamp) -> dbt's parsed Manifest
RESULT_EVENTS = frozenset({"LogSeedResult", "LogModelResult", "LogSnapshotResult", "LogTestResult"})
CLIENT_CHECK = "-c client_connection_check_interval=2000"
STAMP = "dcr_manifest.sha256"
PREPARE_LOCK = ".dcr_prepare.lock"


class DbtRunError(RuntimeError):
    """dbt could not parse the project, or a build failed."""


@dataclass
class BuildResult:
    success: bool
    events: list[dict[str, Any]]  # dbt's result events, as its JSON log would carry them
    errors: list[str]  # "node: message" per failed node, or dbt's own error


# Never in the environment of a dbt invocation: the deployment's secrets and the operator's database URLs.
HIDDEN = ("DCR_DATABASE_URL", "DCR_DAGSTER_DATABASE_URL", "PGPASSWORD", "PGUSER", "PGOPTIONS")


def _hidden() -> dict[str, None]:
    return {k: None for k in os.environ if k.startswith(SECRET_PREFIX) or k in HIDDEN}


@contextlib.contextmanager
def _environment(extra: Mapping[str, str | None]) -> Iterator[None]:
    """``extra`` set in the environment for the block (None: removed), then the previous values restored."""
    saved = {k: os.environ.get(k) for k in extra}
    for k, v in extra.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _base_args(project: Path) -> list[str]:
    return ["--project-dir", str(project), "--profiles-dir", str(project)]


def parse(project: Path, *, write_json: bool = False) -> Any:
    """Parse the project in this process (partial parsing from its target folder); the caller holds the prepare lock."""
    from dbt.cli.main import dbtRunner

    args = ["parse", *_base_args(project), "--quiet", "--log-path", str(project / "target")]
    if not write_json:
        args.append("--no-write-json")
    with _LOCK, _environment({**_hidden(), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}):
        result = dbtRunner().invoke(args)
    if not result.success or result.result is None:
        raise DbtRunError(f"dbt parse failed in {project}: {result.exception or 'see target/dbt.log'}")
    return result.result


def parsed_manifest(project: Path) -> Any:
    """dbt's parsed manifest of the prepared project, parsed once per process and manifest."""
    stamp_path = project / "target" / STAMP
    stamp = stamp_path.read_text().strip() if stamp_path.is_file() else ""
    key = (str(project), stamp)
    if key not in _PARSED:
        with (project / PREPARE_LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = parse(project)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _PARSED.clear()  # one project's manifest at a time; an older one is stale
        _PARSED[key] = manifest
    return _PARSED[key]


def remember(project: Path, stamp: str, manifest: Any) -> None:
    """Keep a manifest this process just parsed (the prepare step), so its builds need not parse again."""
    _PARSED.clear()
    _PARSED[(str(project), stamp)] = manifest


def build(project: Path, selection: list[str], *, label: str, login: Login) -> BuildResult:
    """``dbt build`` of ``selection`` in this process as ``login``, in a target folder of its own (removed afterwards)."""
    from dbt.cli.main import dbtRunner
    from dbt_common.events.functions import msg_to_dict

    manifest = parsed_manifest(project)
    events: list[dict[str, Any]] = []
    errors: list[str] = []

    def collect(msg: Any) -> None:
        if msg.info.name in RESULT_EVENTS:
            events.append(msg_to_dict(msg))

    target = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=project / "target"))
    extra: dict[str, str | None] = {**_hidden(), "PGOPTIONS": CLIENT_CHECK, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                                    "DCR_PG_USER": login.user, "DBT_ENV_SECRET_PG_PASSWORD": login.password}
    args = ["build", *_base_args(project), "--target-path", str(target), "--log-path", str(target), "--no-write-json", *selection]
    try:
        with _LOCK, _environment(extra):
            result = dbtRunner(manifest=manifest, callbacks=[collect]).invoke(args)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    if isinstance(result.exception, KeyboardInterrupt):
        errors.append("dbt was interrupted (Ctrl-C or a stop request); what it had not committed was rolled back: run it again")
    elif result.exception is not None:
        errors.append(f"dbt: {str(result.exception).strip() or result.exception.__class__.__name__}")
    for node in getattr(result.result, "results", None) or []:
        if str(node.status) in {"error", "fail", "runtime error"}:
            errors.append(f"{node.node.name}: {(node.message or str(node.status)).strip()}")
    return BuildResult(success=bool(result.success), events=events, errors=errors)


def dagster_events(result: BuildResult, context: dg.AssetExecutionContext, manifest_json: Mapping[str, Any], translator: Any) -> Iterator[Any]:
    """Dagster's events for dbt's results, as dagster-dbt makes them from a ``dbt build`` child's JSON log."""
    from dagster_dbt.core.dbt_cli_event import DbtCoreCliEventMessage

    for raw in result.events:
        yield from DbtCoreCliEventMessage(raw_event=raw, event_history_metadata={}).to_default_asset_events(
            manifest=manifest_json, dagster_dbt_translator=translator, context=context)


def selection_for(context: dg.AssetExecutionContext, manifest_json: Mapping[str, Any], select: str, translator: Any) -> list[str]:
    """dbt selection arguments for the assets and checks this step was asked for (all of ``select`` when not a subset)."""
    from dagster_dbt.asset_utils import get_subset_selection_for_context

    args, indirect = get_subset_selection_for_context(
        context=context, manifest=manifest_json, select=select, exclude=None, selector=None,
        dagster_dbt_translator=translator, current_dbt_indirect_selection_env=os.environ.get("DBT_INDIRECT_SELECTION"))
    return [*args, *(["--indirect-selection", indirect] if indirect else [])]


class DbtRunnerResource(dg.ConfigurableResource):
    """The deployment's prepared dbt project, built in this process."""

    project_dir: str

    def build_stage(self, context: dg.AssetExecutionContext, manifest_json: Mapping[str, Any], select: str, translator: Any, login: Login,
                    models: list[str] | None = None, extra: list[str] | None = None) -> Iterator[Any]:
        """Build what ``context`` selected of ``select`` (or just ``models`` and the tests on them alone); Dagster events
        per model and test; a failed build fails the step (after the events of what did build) with one line per failed node."""
        project = Path(self.project_dir)
        if models is not None:
            selection = ["--select", *models, "--indirect-selection", "cautious"]
        else:
            selection = selection_for(context, manifest_json, select, translator)
        selection = [*selection, *(extra or [])]
        label = context.assets_def.node_def.name
        result = build(project, selection, label=label, login=login)
        yield from dagster_events(result, context, manifest_json, translator)
        if not result.success:
            raise dg.Failure(f"dbt build of {label} failed: " + "; ".join(result.errors or ["see the run's log"]))
