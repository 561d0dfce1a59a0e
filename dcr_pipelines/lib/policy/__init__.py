"""Collaboration policy: typed models and a loader that reports mistakes by file and line."""

from .loader import (
    ApprovedQuery,
    LoadedCollaboration,
    PolicyError,
    PolicyIssue,
    check_policies,
    discover,
    load_collaboration,
    query_sha256,
)

__all__ = [
    "ApprovedQuery",
    "LoadedCollaboration",
    "PolicyError",
    "PolicyIssue",
    "check_policies",
    "discover",
    "load_collaboration",
    "query_sha256",
]
