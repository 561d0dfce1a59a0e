"""`dcr psi`: a party's half of matching, on its own machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..lib.text import plural
from ._common import fail, main, member_option, out


@main.group()
def psi() -> None:
    """A party's half of matching, on its own machine (for parties listed in matching.home_parties).

    \b
    The party keeps its identifiers and keys; it hands the operator files:
      dcr psi keygen --out ad_network.key
      dcr psi prepare demo_home --member ad_network --key ad_network.key \\
          --dataset impressions=impressions.csv --out outbox/
      (upload outbox/impressions.csv as usual, give the operator outbox/ad_network-setup.dcrpsi)
      dcr psi respond demo_home --member ad_network --key ad_network.key \\
          --request ad_network-request-<id>.dcrpsi --out outbox/
    """


def _policy_only(collab: str, policies: Path | None) -> Any:
    """A collaboration's policy without the database: these commands run on a party's own machine."""
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.settings import Settings

    folder = (policies or Settings.from_env().policies) / collab
    if not folder.is_dir():
        fail(f"no collaboration {collab!r} under {folder.parent}", 2)
    try:
        return load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)


def _home_party(loaded: Any, party: str) -> None:
    if not loaded.at_home(party):
        fail(f"{party!r} is not listed in matching.home_parties of {loaded.name} (policies/{loaded.name}/collaboration.yaml)", 2)


@psi.command("keygen")
@click.option("--out", "path", required=True, type=click.Path(path_type=Path), help="Key file to create (owner-only permissions).")
def psi_keygen(path: Path) -> None:
    """Create a party's key file: its token (HMAC) key and its PSI key. Keep it; never send it."""
    from ..lib import home_psi

    try:
        home_psi.generate_keys(path)
    except FileExistsError:
        fail(f"{path} exists; keys are not overwritten (tokens would change)", 2)
    out.print(f"wrote {path} (mode 600)")


@psi.command("prepare")
@click.argument("collab")
@member_option("The member keeping its identifiers at home (its own machine runs this).", param="party", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", "datasets", multiple=True, required=True, metavar="NAME=PATH", help="One of the party's datasets and its file; repeatable.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the tokenised uploads and the setup message.")
@click.option("--policies", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Policy folder (default: DCR_POLICIES or policies/).")
def psi_prepare(collab: str, party: str, key_path: Path, datasets: tuple[str, ...], out_dir: Path, policies: Path | None) -> None:
    """Tokenise the party's files and write its PSI setup message, all on this machine.

    Identifiers are normalised as docs/identifiers.md says and replaced by
    HMAC tokens under the party's key; rows whose identifier cannot be
    normalised are dropped and counted. Nothing is sent anywhere.
    """
    from ..lib import home_psi

    loaded = _policy_only(collab, policies)
    _home_party(loaded, party)
    files = {}
    for item in datasets:
        name, sep, path = item.partition("=")
        if not sep or not path:
            fail(f"--dataset {item!r}: expected NAME=PATH", 2)
        files[name] = Path(path)
    try:
        prepared, setup = home_psi.prepare(loaded, party, home_psi.load_keys(key_path), files, out_dir)
    except (home_psi.MessageError, OSError) as exc:
        fail(str(exc), 2)
    for done in prepared:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(done.rejected.items())) or "none"
        out.print(f"{done.dataset}: {done.rows_out:,} of {plural(done.rows_in, 'row')} tokenised -> {done.output} (dropped: {dropped})")
    out.print(f"setup message: {setup} (give it to the operator; upload the tokenised files as usual)")


@psi.command("respond")
@click.argument("collab")
@member_option("The member keeping its identifiers at home (its own machine runs this).", param="party", required=True)
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--request", "request_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def psi_respond(collab: str, party: str, key_path: Path, request_path: Path, out_dir: Path) -> None:
    """Answer the operator's PSI request with the party's key; the answer goes back to the operator."""
    from ..lib import home_psi

    try:
        answer = home_psi.respond(home_psi.load_keys(key_path), request_path, collab, party, out_dir)
    except home_psi.MessageError as exc:
        fail(str(exc), 2)
    out.print(f"response: {answer} (give it to the operator)")
