"""Roles and grants from the policy, and the policy version in the audit chain."""


import dagster as dg

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..store import access, audit_chain
from .resources import WarehouseResource


def _grants_asset(loaded: LoadedCollaboration) -> dg.AssetsDefinition:
    c = loaded.name

    @dg.asset(
        key=naming.grants_key(c),
        code_version=loaded.policy_sha256[:16],
        group_name=c,
        kinds={"postgres"},
        tags={"dcr/stage": "access"},
        owners=["team:operator"],
        description=f"Schemas, least-privilege roles and grants of {c}, derived from the policy and applied idempotently "
        "(per party: raw owner, staging loader, result reader; shared: matching, analysis builder, query runner, admin).",
    )
    def grants(warehouse: WarehouseResource) -> dg.MaterializeResult:
        with warehouse.connect() as conn:
            count = access.apply(conn, loaded)
            # Each policy version the pipeline applies is in the audit chain.
            chained = audit_chain.record_policy(conn, naming.results_schema(c), c, loaded.policy_sha256,
                                                {q: query.sha256 for q, query in loaded.queries.items()})
        return dg.MaterializeResult(
            metadata={"roles": ", ".join(access.roles(loaded)), "grants": dg.MetadataValue.int(count), "policy_sha256": loaded.policy_sha256,
                      "audit_chain_sha256": chained.chain_sha256 if chained else ""}
        )

    return grants
