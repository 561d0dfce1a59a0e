"""The one entry point: every collaboration under policies/ as an asset group."""

from __future__ import annotations

import json
import logging

import dagster as dg
from dagster_dbt import DbtCliResource

from .defs.collaboration import build_collaboration
from .defs.resources import SecretsResource, WarehouseResource
from .lib.dbt_manifest import dbt_executable, prepare_manifest
from .lib.policy import check_policies
from .lib.runtime import activate, ensure_development_secrets, secret_env_name
from .lib.settings import Settings

log = logging.getLogger(__name__)


def build_definitions(settings: Settings) -> dg.Definitions:
    """Load every valid collaboration; a broken policy folder is reported and skipped, not fatal."""
    loaded, issues = check_policies(settings.policies)
    for issue in issues:
        log.error("policy skipped: %s", issue)
    # Parsed here, not passed as a path: dagster-dbt caches manifests by path per process,
    # which would keep a stale graph after the policies change (code-server reloads, tests).
    manifest = json.loads(prepare_manifest(settings.dbt_project, loaded).read_text())
    parts = [build_collaboration(c, manifest, settings.landing, settings.exports) for c in loaded]
    resources = dg.Definitions(
        resources={
            "warehouse": WarehouseResource(url=dg.EnvVar("DCR_WAREHOUSE_URL")),
            "secrets": SecretsResource(),
            "dbt": DbtCliResource(project_dir=str(settings.dbt_project), profiles_dir=str(settings.dbt_project), dbt_executable=str(dbt_executable())),
        }
    )
    return dg.Definitions.merge(*parts, resources)


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
    if runtime.embedded:
        ensure_development_secrets(runtime.settings.home, secret_names(runtime.settings))
    return build_definitions(runtime.settings)
