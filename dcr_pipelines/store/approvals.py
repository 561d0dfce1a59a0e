"""Approvals made under a member's own login, kept in the collaboration's audit chain.

A member with a login (`dcr member add`) approves only through it: `dcr policy approve COLLAB --credentials FILE`
sends the hashes of its reviewed copy of the policy as an ``approve`` request; the operator's side records them here
(kind ``approval``, ref the member, with the request's id and login) when they equal the operator's copy, and writes the
same approval into the policy files for git review. For such a member the files alone no longer suffice: releases and
ad-hoc queries are refused (rule ``approval``) unless the chain's latest approval of that member, made by its login
through a request row it wrote, carries the query's current hash and protections that the current ones do not loosen.
A member without a login is approved by the files, as before (the operator's single-machine use).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from ..lib import naming
from ..lib.policy import LoadedCollaboration
from ..lib.policy import protections as protections_lib
from ..lib.policy.loader import approvers
from . import audit_chain, members

KIND = "approval"


def record(conn: psycopg.Connection, loaded: LoadedCollaboration, member: str, login: str, request_id: int,
           approved: dict[str, str]) -> audit_chain.ChainRow:
    """Chain ``member``'s approval (``approved``: the request's payload, equal to the operator's copy), with the protection
    document it approves (kept whole: a later tightening is still covered by it)."""
    entry = {
        "member": member, "login": login, "request": request_id, "policy_sha256": loaded.policy_sha256,
        "queries": {k.removeprefix("query:"): v for k, v in sorted(approved.items()) if k.startswith("query:")},
        "protections_sha256": approved.get(f"protections:{member}", ""),
        "protections": protections_lib.document(loaded.collaboration, member),
    }
    return audit_chain.append(conn, naming.results_schema(loaded.name), loaded.name, KIND, member, entry)


def _latest(conn: psycopg.Connection, schema: str, member: str | None = None) -> dict[str, dict[str, Any]]:
    """The latest ``approval`` entry of each member (of ``member`` only, if given)."""
    if conn.execute("select to_regclass(%s)", (f'"{schema}"."{audit_chain.TABLE}"',)).fetchone()[0] is None:  # type: ignore[index]
        return {}
    rows = conn.execute(sql.SQL("select distinct on (ref) ref, entry from {} where kind = %s and (%s::text is null or ref = %s) "
                                "order by ref, seq desc").format(sql.Identifier(schema, audit_chain.TABLE)), (KIND, member, member)).fetchall()
    return {str(ref): dict(entry) for ref, entry in rows}


def _requested(conn: psycopg.Connection, collab: str, entry: dict[str, Any], login: str) -> bool:
    """The entry answers an ``approve`` request of this collaboration that ``login`` itself wrote, answered, asking for
    these very hashes; and the protection document it keeps is the one those hashes name."""
    row = conn.execute("select payload from dcr_meta.member_requests where id = %s and login = %s and collaboration = %s "
                       "and kind = 'approve' and state = 'answered'", (int(entry.get("request") or 0), login, collab)).fetchone()
    if row is None or not isinstance(row[0], dict) or not isinstance(entry.get("protections"), dict):
        return False
    asked = {k.removeprefix("query:"): v for k, v in row[0].items() if k.startswith("query:")}
    member = entry.get("member")
    return (asked == entry.get("queries") and row[0].get(f"protections:{member}") == entry.get("protections_sha256")
            and protections_lib.digest(entry["protections"]) == entry.get("protections_sha256"))


def unbacked(conn: psycopg.Connection, loaded: LoadedCollaboration, query: str | None = None) -> list[str]:
    """Why the approvals ``query`` (None: only the protections, for ad-hoc SQL and the overlap) needs are not all made
    through the members' logins; empty when they are.

    Who is checked: every party with a login, and every member that ever approved through one (a revoked login, a
    renamed member or one that gave its datasets away does not make the policy files count again for it). A member
    whose approved datasets are all gone from the policy has nothing left to protect."""
    logins = {m.member: m.login for m in members.listing(conn, loaded.name)}
    collab = loaded.collaboration
    schema = naming.results_schema(loaded.name)
    entries = _latest(conn, schema)
    parties = approvers(collab)
    problems = []
    for member in [*parties, *sorted((set(entries) | set(logins)) - set(parties))]:
        entry = entries.get(member)
        login = logins.get(member) or (str(entry.get("login")) if entry else None)
        if login is None:
            continue  # no login, never approved through one: the policy files decide (checked when the policy loads)
        how = f"{member} approves through its login: `dcr policy approve {loaded.name} --credentials {member}.json`"
        if member not in parties:
            approved = entry.get("protections") if entry else None
            if not isinstance(approved, dict) or not set(approved.get("datasets") or {}) & set(collab.datasets):
                continue  # provides no data now and none of what it approved is left
        if entry is None or entry.get("login") != login or not _requested(conn, loaded.name, entry, login):
            problems.append(f"{member} has a member login, so only an approval made through it counts, and there is none in the audit "
                            f"chain ({how})")
            continue
        if query is not None and member in parties:
            current = loaded.queries[query].sha256
            if entry["queries"].get(query) != current:
                problems.append(f"{member}'s login has not approved query {query!r} as it is now (sha256 {current[:12]}...; "
                                f"its approval in the audit chain is {str(entry['queries'].get(query) or 'none')[:12]}); {how}")
                continue
        now = protections_lib.document(collab, member)
        if protections_lib.digest(now) != entry.get("protections_sha256"):
            try:
                loose = protections_lib.loosened(entry["protections"], now, collab)
            except (KeyError, TypeError, ValueError):  # a document of another version of the product: approve again
                loose = [((), "the approval's protection document is of another form")]
            if loose:
                problems.append(f"the policy loosens what {member} approved through its login ({loose[0][1]}); {how}")
    return problems
