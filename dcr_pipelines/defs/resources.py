"""Typed resources: the warehouse connection and the secret store."""

from __future__ import annotations

import os

import dagster as dg

from ..lib.runtime import secret_env_name
from ..store import Connection, open_connection


class WarehouseResource(dg.ConfigurableResource):
    """The PostgreSQL that holds every collaboration's schemas."""

    url: str

    def connect(self) -> Connection:
        return open_connection(self.url)


class SecretsResource(dg.ConfigurableResource):
    """Per-party HMAC keys and per-collaboration pairing keys, read when a step needs them.

    Names are derived from the policy (DCR_SECRET__HMAC__<COLLAB>__<PARTY>,
    DCR_SECRET__PAIRING__<COLLAB>), so a new collaboration needs new
    variables, not new code. Values are hex or text; they never reach SQL
    text, dbt vars, logs or metadata.
    """

    def _get(self, *parts: str) -> bytes:
        name = secret_env_name(*parts)
        value = os.environ.get(name)
        if not value:
            raise dg.Failure(f"secret {name} is not set (see docs/operations.md, Secrets)")
        try:
            return bytes.fromhex(value)
        except ValueError:
            return value.encode("utf-8")

    def hmac_key(self, collaboration: str, party: str) -> bytes:
        return self._get("HMAC", collaboration, party)

    def pairing_key(self, collaboration: str) -> bytes:
        return self._get("PAIRING", collaboration)
