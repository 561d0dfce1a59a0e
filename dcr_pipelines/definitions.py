"""The one entry point: every collaboration under policies/ as an asset group."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import dagster as dg

from .defs.collaboration import build_collaboration
from .defs.dbt_project import prepare_project, project_dir
from .defs.dbt_runner import DbtRunnerResource
from .defs.resources import SecretsResource, WarehouseResource
from .lib.policy import check_policies
from .lib.runtime import activate, development_secrets_allowed, ensure_development_secrets, secret_env_name
from .lib.settings import Settings

log = logging.getLogger(__name__)


def build_definitions(settings: Settings) -> dg.Definitions:
    """Load every valid collaboration, each in isolation: a broken policy folder, or one whose assets cannot be built,
    is logged and reported by a sensor of its own (Automation in the UI), and the others load."""
    loaded, issues = check_policies(settings.policies)
    broken: dict[str, list[str]] = {}
    for issue in issues:
        log.error("policy skipped: %s", issue)
        broken.setdefault(_folder_name(settings, issue.file), []).append(str(issue))
    # Parsed here, not passed as a path: dagster-dbt caches manifests by path per process,
    # which would keep a stale graph after the policies change (code-server reloads, tests).
    project = prepare_project(settings.dbt_source, project_dir(settings.dbt_project, settings.policies), loaded)
    manifest = json.loads(project.manifest_path.read_text())
    parts: list[dg.Definitions] = []
    for collab in loaded:
        try:
            part = build_collaboration(collab, manifest, settings.landing, settings.exports, project.project_dir)
        except Exception as exc:  # one collaboration's defect must not take the others down
            log.exception("collaboration %s skipped: its assets could not be built", collab.name)
            broken.setdefault(collab.name, []).append(f"{collab.folder}: its assets could not be built ({exc.__class__.__name__}: {exc})")
            continue
        parts.append(part)
    resources = dg.Definitions(
        resources={
            "warehouse": WarehouseResource(url=dg.EnvVar("DCR_WAREHOUSE_URL")),
            "secrets": SecretsResource(),
            "dbt": DbtRunnerResource(project_dir=str(project.project_dir)),
        },
        sensors=[_broken_policy_sensor(name, problems) for name, problems in sorted(broken.items())],
    )
    executor = _executor()
    return dg.Definitions.merge(*parts, resources, *([dg.Definitions(executor=executor)] if executor is not None else []))


def _folder_name(settings: Settings, path: Path) -> str:
    """The collaboration folder a policy issue is in (its first path part under the policies root)."""
    try:
        return path.resolve().relative_to(settings.policies.resolve()).parts[0]
    except (ValueError, IndexError):
        return path.stem


def _broken_policy_sensor(folder: str, problems: list[str]) -> dg.SensorDefinition:
    """Shows, in the UI, why a collaboration did not load (its sensor never launches a run)."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", folder)

    @dg.sensor(name=f"{safe}__policy_broken", minimum_interval_seconds=300,
               description=f"{folder} did not load: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
               + " Fix it (`dcr policy check`) and reload the code location.")
    def broken_policy(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        return dg.SkipReason(f"{folder} did not load: " + "; ".join(problems))

    return broken_policy


def _executor() -> dg.ExecutorDefinition | None:
    """The executor of the collaboration jobs, chosen by the deployment (DCR_EXECUTOR), not by code.

    Unset or ``in_process``: every step in the run's process. Measured on the demo
    (benchmarks/results/executors.json), a process per step costs more than it saves on
    one machine: each step process loads the definitions again, while the heavy steps
    already use every core inside (dbt threads, the PSI process pool).
    ``multiprocess``: Dagster's default executor (a run config may pick a ``start_method``
    such as forkserver). ``celery``: every step goes to Celery workers over
    DCR_CELERY_BROKER (default redis://127.0.0.1:6379/0); see docs/operations.md.
    """
    choice = os.environ.get("DCR_EXECUTOR", "").strip().lower()
    if choice in ("", "in_process"):
        return dg.in_process_executor
    if choice in ("default", "multiprocess"):
        return None
    if choice == "celery":
        from dagster_celery import celery_executor

        broker = os.environ.get("DCR_CELERY_BROKER", "redis://127.0.0.1:6379/0")
        return celery_executor.configured({"broker": broker, "backend": os.environ.get("DCR_CELERY_BACKEND", broker)}, name="celery")
    raise ValueError(f"DCR_EXECUTOR={choice!r}: expected multiprocess, in_process or celery")


def secret_names(settings: Settings) -> list[str]:
    """Every secret the valid collaborations need: an HMAC key per party (none for a party at home), a pairing key each."""
    loaded, _ = check_policies(settings.policies)
    names = []
    for collab in loaded:
        names.append(secret_env_name("PAIRING", collab.name))
        names.extend(secret_env_name("HMAC", collab.name, party) for party in collab.parties() if not collab.at_home(party))
    return names


@dg.definitions
def defs() -> dg.Definitions:
    runtime = activate()
    if development_secrets_allowed(runtime.embedded):
        ensure_development_secrets(runtime.settings.home, secret_names(runtime.settings))
    return build_definitions(runtime.settings)
