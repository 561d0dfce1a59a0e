"""Per-party HMAC keys, turned into the two padded blocks the SQL HMAC needs.

HMAC-SHA256(K, m) = SHA256((K' ^ opad) || SHA256((K' ^ ipad) || m)), where
K' is K zero-padded to the 64-byte block (or SHA256(K) if K is longer).
Computing the pads here lets the database finish HMAC with core ``sha256()``; they reach it only as bound
parameters of the statement that opens them to a staging build (``store.builder.open_pads``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

BLOCK = 64


@dataclass(frozen=True)
class HmacPads:
    inner: bytes
    outer: bytes

    def __repr__(self) -> str:  # never print key material
        return "HmacPads(<redacted>)"


def hmac_pads(key: bytes) -> HmacPads:
    """The inner and outer padded keys of RFC 2104 for SHA-256."""
    if not key:
        raise ValueError("an HMAC key must not be empty")
    if len(key) > BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(BLOCK, b"\0")
    return HmacPads(bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key))
