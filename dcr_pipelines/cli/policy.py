"""`dcr policy`: check, render, hash and approve collaboration policies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from ..lib.text import plural
from ._common import err, fail, main, out


@main.group()
def policy() -> None:
    """Lint and inspect collaboration policy files."""


@policy.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def policy_check(path: Path | None) -> None:
    """Check every collaboration under PATH (default: policies/); exit 2 on any mistake.

    \b
    Example:
      dcr policy check policies/demo
    """
    from ..lib.policy import check_policies
    from ..lib.settings import Settings

    root = path or Settings.from_env().policies
    loaded, issues = check_policies(root)
    for issue in issues:
        err.print(f"error: {issue}", markup=False, soft_wrap=True)
    for collab in loaded:
        out.print(f"ok: {collab.name} ({plural(len(collab.collaboration.datasets), 'dataset')}, {plural(len(collab.queries), 'query')})")
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
    party approves the result with `dcr policy approve NAME --as PARTY`.

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
              f"`dcr policy approve {name} --as PARTY`", markup=False, soft_wrap=True)


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
def policy_hash(collab: str) -> None:
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
    for spec_path in sorted(folder.glob("*.yaml")):
        try:
            out.print(f"{spec_path.stem}  {query_hash(spec_path)}")
        except PolicyError as exc:
            fail(str(exc.issues[0]), 2)


@policy.command("approve")
@click.argument("collab")
@click.option("--as", "member", required=True, help="The member approving (a member that provides data).")
def policy_approve(collab: str, member: str) -> None:
    """Approve, as MEMBER, the current hash of every query of COLLAB and what protects MEMBER's data.

    Writes MEMBER's entries under `approvals:` in collaboration.yaml and
    protections/MEMBER.json; review the change in git like any other.

    \b
    Example:
      dcr policy approve demo --as retailer
    """
    from ..lib.policy import PolicyError
    from ..lib.policy.approve import NothingToApprove, approve
    from ..lib.settings import Settings

    folder = Settings.from_env().policies / collab
    if not (folder / "collaboration.yaml").is_file():
        fail(f"no collaboration {collab!r} under {folder.parent}", 2)
    try:
        done = approve(folder, member)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    except NothingToApprove as exc:
        fail(str(exc), 2)
    for name, digest in done.queries.items():
        out.print(f"{name}: {member} approves sha256 {digest}")
    out.print(f"protections of {member}'s data: sha256 {done.protections_sha256} ({done.protections_path})")


# --- stages ------------------------------------------------------------------------
