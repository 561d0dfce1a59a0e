"""`dcr policy`: check, render, hash and approve collaboration policies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from ..lib.text import plural
from ._common import err, fail, main, member_option, out
from ._output import Listing, emit, format_option


@main.group()
def policy() -> None:
    """Lint and inspect collaboration policy files."""


@policy.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@format_option()
def policy_check(path: Path | None, fmt: str) -> None:
    """Check every collaboration under PATH (default: policies/); exit 2 on any mistake.

    \b
    Example:
      dcr policy check policies/demo
    """
    from ..lib.policy import check_policies
    from ..lib.settings import Settings

    root = path or Settings.from_env().policies
    loaded, issues = check_policies(root)
    for issue in issues:  # mistakes are errors in every format: one line each on stderr, naming file, line and field
        err.print(f"error: {issue}", markup=False, soft_wrap=True)
    rows = [{"collaboration": c.name, "datasets": len(c.collaboration.datasets), "queries": len(c.queries), "policy_sha256": c.policy_sha256}
            for c in loaded]

    def table() -> None:
        for c in loaded:
            out.print(f"ok: {c.name} ({plural(len(c.collaboration.datasets), 'dataset')}, {plural(len(c.queries), 'query')})")

    # One row per collaboration that passed; the ones with mistakes are the error lines (and the exit code).
    emit(Listing(["collaboration", "datasets", "queries", "policy_sha256"], rows, about={"path": str(root), "mistakes": len(issues)}), fmt, table=table)
    if issues:
        sys.exit(2)


@policy.command("new")
@click.argument("name")
@click.option("--parties", metavar="A,B[,...]", help="The members that bring data, comma-separated (default: party_a,party_b); "
              "the first one runs queries.")
def policy_new(name: str, parties: str | None) -> None:
    """Create the collaboration folder NAME under the policies folder, with every file it needs.

    collaboration.yaml (members, one dataset per party, matching, budget,
    approvals), one differentially private query (queries/overview.sql and
    .yaml) and each party's protections/<party>.json, every YAML field
    commented. `dcr policy check` accepts it as it is; edit it, then each
    party approves the result with `dcr policy approve NAME --member PARTY`.

    \b
    Example:
      dcr policy new retail_media --parties retailer,publisher
    """
    from ..lib.policy.scaffold import ScaffoldError, create, parse_parties
    from ..lib.settings import Settings

    root = Settings.from_env().policies
    try:
        folder = create(root, name, parse_parties(parties))
    except ScaffoldError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"cannot write {root / name}: {exc.strerror or exc}", 2)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out.print(f"wrote {path}", markup=False, soft_wrap=True)
    out.print(f"{name}: ready for `dcr policy check`; edit the files, then each party approves: "
              f"`dcr policy approve {name} --member PARTY`", markup=False, soft_wrap=True)


@policy.command("render")
@click.argument("collab")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write the models into: empty, or one an earlier render wrote (it is replaced).")
def policy_render(collab: str, out_dir: Path) -> None:
    """Write the dbt models COLLAB's policy generates, for review (the demo's are kept in dbt_project/golden/).

    \b
    Example:
      dcr policy render demo --out dbt_project/golden/demo && git diff dbt_project/golden
    """
    from ..lib import dbt_codegen
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.settings import Settings

    folder = Settings.from_env().policies / collab
    if not (folder / "collaboration.yaml").is_file():
        fail(f"no collaboration {collab!r} under {folder.parent} (expected {folder / 'collaboration.yaml'})", 2)
    try:
        loaded = load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]) + (f" (and {len(exc.issues) - 1} more; run `dcr policy check`)" if len(exc.issues) > 1 else ""), 2)
    files = dbt_codegen.render(loaded)
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir}: not a folder; give a folder to write the models into", 2)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "_collaboration.yml").is_file():
        fail(f"--out {out_dir}: the folder holds other files; give an empty folder or one written by `dcr policy render`", 2)
    try:
        shutil.rmtree(out_dir, ignore_errors=True)
        dbt_codegen.write_rendered(out_dir, files)
    except OSError as exc:
        fail(f"--out {out_dir}: cannot write the models there ({exc.strerror or exc})", 2)
    out.print(f"{plural(len(files), 'file')} written to {out_dir}", markup=False)


@policy.command("hash")
@click.argument("collab")
@format_option()
def policy_hash(collab: str, fmt: str) -> None:
    """Print the SHA-256 each data owner approves for every query of COLLAB.

    \b
    Example:
      dcr policy hash demo
    """
    from ..lib.policy import PolicyError
    from ..lib.policy.loader import query_hash
    from ..lib.settings import Settings

    folder = Settings.from_env().policies / collab / "queries"
    if not folder.is_dir():
        fail(f"no queries folder {folder}", 2)
    rows = []
    for spec_path in sorted(folder.glob("*.yaml")):
        try:
            rows.append({"query": spec_path.stem, "sha256": query_hash(spec_path)})
        except PolicyError as exc:
            fail(str(exc.issues[0]), 2)

    def table() -> None:
        for r in rows:
            out.print(f"{r['query']}  {r['sha256']}", markup=False)

    emit(Listing(["query", "sha256"], rows, about={"collaboration": collab}), fmt, table=table)


@policy.command("approve")
@click.argument("collab")
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="Your credentials file (`dcr member add`): "
              "approve as yourself, through your login; or set DCR_MEMBER_URL.")
@click.option("--folder", "reviewed", type=click.Path(path_type=Path, file_okay=False), help="With --credentials: your reviewed copy of "
              "COLLAB's policy folder (default: COLLAB under DCR_POLICIES, or this installation's policies/).")
@member_option("The operator, approving for a member that has no login (a member with a login approves only through it).")
def policy_approve(collab: str, credentials_path: Path | None, reviewed: Path | None, member: str | None) -> None:
    """Approve the current hash of every query of COLLAB and what protects your data.

    A member with a login approves through it: the hashes of its own copy of
    the policy (the one it reviewed) are sent to the operator, who records the
    approval in the audit chain under the member's login and writes it into
    collaboration.yaml and protections/MEMBER.json, when the operator's copy
    is the same. With --member (the operator, for a member without a login), it
    writes MEMBER's entries into the files only; review them in git.

    \b
    Examples:
      dcr policy approve demo --credentials retailer.json --folder ./policies/demo
      dcr policy approve demo --member retailer
    """
    from ..lib.policy import PolicyError
    from ..lib.policy.approve import NothingToApprove, approve
    from ..lib.settings import Settings
    from .member import credentials, refuse_as

    creds = credentials(credentials_path)
    refuse_as(member, creds)
    folder = Settings.from_env().policies / collab
    if creds:
        _approve_through_login(creds, collab, reviewed or folder)
        return
    if reviewed is not None:
        fail("--folder goes with --credentials (the member's reviewed copy); the operator approves its own policies folder", 2)
    if not member:
        raise click.UsageError("missing option '--credentials FILE' (a member's own login) or '--member' (the operator, for a member without a login)")
    if not (folder / "collaboration.yaml").is_file():
        fail(f"no collaboration {collab!r} under {folder.parent}", 2)
    _refuse_member_with_login(collab, member)
    try:
        done = approve(folder, member)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    except NothingToApprove as exc:
        fail(str(exc), 2)
    for name, digest in done.queries.items():
        out.print(f"{name}: {member} approves sha256 {digest}")
    out.print(f"protections of {member}'s data: sha256 {done.protections_sha256} ({done.protections_path})")


def _refuse_member_with_login(collab: str, member: str) -> None:
    """The operator approves for a member only while it has no login: one with a login approves through it (this is the
    courtesy; the guarantee is that releases and ad-hoc queries count only its login's approval, ``store.approvals``)."""
    from ..store import members
    from ._common import _runtime

    login = members.login_of(_runtime().warehouse.url(), collab, member)
    if login is not None:
        fail(f"{member} has a member login ({login}): it approves only through it (`dcr policy approve {collab} --credentials "
             f"{member}.json`, on its own machine); an approval written with --member would not count", 2)


def _approve_through_login(creds: dict[str, str], collab: str, folder: Path) -> None:
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.policy.approve import approval_payload
    from .member import ask

    if not (folder / "collaboration.yaml").is_file():
        fail(f"no copy of {collab}'s policy at {folder} (no collaboration.yaml): you approve the copy you reviewed; give its folder "
             "with --folder", 2)
    try:
        loaded = load_collaboration(folder, approvals=False)
    except PolicyError as exc:
        fail(f"your copy of the policy does not load: {exc.issues[0]}", 2)
    done = ask(creds, collab, "approve", approval_payload(loaded))
    answer = done.answer or {}
    who = done.member
    for name, digest in sorted((answer.get("queries") or {}).items()):
        out.print(f"{name}: {who} approves sha256 {digest}", markup=False)
    out.print(f"protections of {who}'s data: sha256 {answer.get('protections_sha256')}", markup=False)
    out.print(f"recorded in {collab}'s audit chain under login {creds.get('login') or 'yours'} (entry {answer.get('audit_seq')}, chain sha256 "
              f"{str(answer.get('audit_chain_sha256'))[:12]}...)", markup=False, soft_wrap=True)


# --- stages ------------------------------------------------------------------------
