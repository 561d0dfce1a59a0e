"""A small typed adapter over openmined-psi; nothing else imports the library.

ECDH-based PSI: the server blinds its set with its secret key, the client
blinds its own; the client learns which of *its* items are in the server's
set and nothing else about the server's items. Messages cross as bytes.
The RAW container is exact (no false positives); Bloom/GCS containers are
smaller but admit a false-positive rate and are not used for matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import private_set_intersection.python as _psi


class PsiServer:
    """The half that holds a set and answers requests; keeps its key private."""

    def __init__(self, key: bytes | None = None) -> None:
        self._impl = _psi.server.CreateFromKey(key, True) if key else _psi.server.CreateWithNewKey(True)

    def setup_message(self, items: Sequence[str], client_size: int) -> bytes:
        """The blinded set, for the client (exact RAW container, no false positives)."""
        setup = self._impl.CreateSetupMessage(0.0, max(client_size, 1), list(items), _psi.DataStructure.RAW)
        return bytes(setup.SerializeToString())

    def answer(self, request: bytes) -> bytes:
        """Blind the client's already-blinded items with this server's key."""
        parsed = _psi.Request()
        parsed.ParseFromString(request)
        return bytes(self._impl.ProcessRequest(parsed).SerializeToString())


class PsiClient:
    """The half that learns which of its own items the server also holds."""

    def __init__(self, key: bytes | None = None) -> None:
        self._impl = _psi.client.CreateFromKey(key, True) if key else _psi.client.CreateWithNewKey(True)

    def request(self, items: Sequence[str]) -> bytes:
        return bytes(self._impl.CreateRequest(list(items)).SerializeToString())

    def intersection(self, setup_message: bytes, response: bytes) -> list[int]:
        """Indices (into the items passed to ``request``) of the items in the server's set."""
        setup = _psi.ServerSetup()
        setup.ParseFromString(setup_message)
        parsed = _psi.Response()
        parsed.ParseFromString(response)
        return sorted(int(i) for i in self._impl.GetIntersection(setup, parsed))


def new_key() -> bytes:
    """A fresh secret key for one party's half (its serialized private scalar)."""
    return bytes(_psi.client.CreateWithNewKey(True).GetPrivateKeyBytes())


def blind(key: bytes, items: Sequence[str]) -> list[bytes]:
    """Each item hashed to the curve and raised to ``key``, in input order (the commutative cipher's encryption)."""
    if not items:
        return []
    request = _psi.Request()
    request.ParseFromString(_psi.client.CreateFromKey(key, True).CreateRequest(list(items)).SerializeToString())
    return list(request.encrypted_elements)


def reblind(key: bytes, elements: Sequence[bytes]) -> list[bytes]:
    """Already-blinded elements raised to ``key`` as well, in input order: blind(b, blind(a, x)) == blind(a, blind(b, x)).

    Two parties that each blind the other's blinded items compare values
    neither could compute alone; equal values are the same identifier.
    """
    if not elements:
        return []
    request = _psi.Request()
    request.reveal_intersection = True
    request.encrypted_elements.extend(elements)
    response = _psi.server.CreateFromKey(key, True).ProcessRequest(request)
    return list(response.encrypted_elements)
