"""`dcr policy approve COLLAB --member MEMBER`: write a party's approvals into its collaboration folder.

The party approves the current hash of every query (``approvals:`` in
``collaboration.yaml``, edited in place: comments and layout stay) and the
current protection document of its data (``protections/<party>.json``).
The loader checks both with the same functions, so what this writes is what
the loader accepts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from . import protections
from .loader import COLLABORATION_FILE, LoadedCollaboration, PolicyError, PolicyIssue, approvers, load_collaboration


class NothingToApprove(ValueError):
    """The member provides no data, so no query or protection waits for its approval."""


@dataclass(frozen=True)
class Approval:
    member: str
    protections_path: Path
    protections_sha256: str
    queries: dict[str, str]  # query -> sha256 approved


def approve(folder: Path, member: str) -> Approval:
    """Approve everything that waits for ``member`` in ``folder``; raise PolicyError for any other mistake."""
    folder = Path(folder)
    loaded = load_collaboration(folder, approvals=False)
    collab = loaded.collaboration
    path = folder / COLLABORATION_FILE
    if member not in collab.members:
        raise PolicyError([PolicyIssue(path, None, None, "members", f"unknown member {member!r} (members: {', '.join(collab.members)})")])
    if member not in approvers(collab):
        raise NothingToApprove(f"{member} provides no data to {collab.name}: no query or protection waits for its approval")
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    data = yaml.load(path.read_text(encoding="utf-8"))
    if data.get("approvals") is None:
        data["approvals"] = CommentedMap()
    approvals = data["approvals"]
    approved: dict[str, str] = {}
    for name, query in loaded.queries.items():
        entries = approvals.get(name)
        if entries is None:
            entries = approvals[name] = CommentedSeq()
        digest = DoubleQuotedScalarString(query.sha256)
        for entry in entries:
            if entry.get("member") == member:
                entry["sha256"] = digest
                break
        else:
            entries.append(CommentedMap([("member", member), ("sha256", digest)]))
        approved[name] = query.sha256
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    snapshot = protections.write_snapshot(folder, collab, member)
    tmp.replace(path)
    return Approval(member, snapshot, protections.digest(protections.document(collab, member)), approved)


def approve_all(folder: Path) -> list[Approval]:
    """Every party approves (tests and demos that build a collaboration on the fly)."""
    collab = load_collaboration(folder, approvals=False).collaboration
    return [approve(folder, party) for party in approvers(collab)]


def approval_payload(loaded: LoadedCollaboration) -> dict[str, str]:
    """What a member approves in ``loaded`` (loaded without its approvals), as the flat request a member login sends:
    ``query:NAME`` -> the query's SHA-256 for every query, and ``protections:PARTY`` -> the digest of what protects each
    party's data (the member's own is the one that counts; its client need not know which member its login is). The
    member computes it from its own reviewed copy of the policy, the operator's side from its copy; the approval is
    recorded only when the two agree."""
    payload = {f"query:{name}": query.sha256 for name, query in loaded.queries.items()}
    for party in approvers(loaded.collaboration):
        payload[f"protections:{party}"] = protections.digest(protections.document(loaded.collaboration, party))
    return payload
