"""`dcr member` (the operator makes member logins), `dcr serve` (answers members' requests), and the member's side:
commands that act as a member take their identity from a member login (`--credentials FILE` or DCR_MEMBER_URL)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.table import Table

from ..lib.text import plural
from ._common import INFRASTRUCTURE, _collaboration, _definitions, _instance, _run_log, _runtime, err, fail, main, out
from ._output import Listing, emit, format_option

MEMBER_URL = "DCR_MEMBER_URL"


@main.group()
def member() -> None:
    """Member logins: each member signs in as itself (the operator makes, lists, rotates and revokes them)."""


def _write_credentials(path: Path, collab: str, member_name: str, login: str, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"collaboration": collab, "member": member_name, "login": login, "url": url}, handle, indent=2)
        handle.write("\n")
    partial.replace(path)


def _member_url(runtime: Any, login: str, password: str, host: str | None, port: int | None) -> str:
    from ..lib.database import listening

    if runtime.embedded:
        listen = listening(runtime.settings.home)
        if listen is None and (host is None or port is None):
            fail("the embedded database listens on its socket only: `dcr db listen --port PORT` first (member logins connect over TCP), "
                 "or give --host and --port of a TCP route to it", 2)
        host = host or (listen[0] if listen else None)
        port = port or (listen[1] if listen else None)
    else:
        host = host or runtime.warehouse.host
        port = port or runtime.warehouse.port
    return f"postgresql://{quote(login, safe='')}:{quote(password, safe='')}@{host}:{port}/{runtime.warehouse.dbname}"


@member.command("add")
@click.argument("collab")
@click.argument("member_name", metavar="MEMBER")
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="Where to write the member's credentials file (default "
              "DCR_HOME/members/COLLAB/MEMBER.json, mode 0600).")
@click.option("--host", help="The host name members reach the database at (default: the listening address).")
@click.option("--port", type=int, help="The port members reach the database at (default: the listening port).")
def member_add(collab: str, member_name: str, out_path: Path | None, host: str | None, port: int | None) -> None:
    """Make MEMBER's database login and write its credentials file (give it to the member, privately).

    \b
    Example:
      dcr db listen --port 5433 && dcr member add demo ad_network
    """
    from ..lib.database import connect
    from ..store import members

    runtime = _runtime()
    loaded = _collaboration(runtime, collab, approvals=False)  # members log in before they approve (they approve through their login)
    with connect(runtime.warehouse.url()) as conn:
        try:
            login, password = members.add(conn, loaded, member_name)
        except members.MemberError as exc:
            fail(str(exc), 2)
    path = out_path or runtime.settings.home / "members" / collab / f"{member_name}.json"
    _write_credentials(path, collab, member_name, login, _member_url(runtime, login, password, host, port))
    out.print(f"{member_name} of {collab}: login {login} made; credentials in {path} (mode 0600: give it to {member_name} privately; "
              f"it is the only copy of the password)", markup=False, soft_wrap=True)
    out.print(f"the member runs: dcr query run {collab} --credentials {path.name} \"SELECT ...\"", markup=False, soft_wrap=True)


@member.command("rotate")
@click.argument("collab")
@click.argument("member_name", metavar="MEMBER")
@click.option("--out", "out_path", type=click.Path(path_type=Path))
@click.option("--host")
@click.option("--port", type=int)
def member_rotate(collab: str, member_name: str, out_path: Path | None, host: str | None, port: int | None) -> None:
    """A new password for MEMBER's login (the old one and its sessions end); a new credentials file."""
    from ..lib.database import connect
    from ..store import members

    runtime = _runtime()
    _collaboration(runtime, collab, approvals=False)
    with connect(runtime.warehouse.url()) as conn:
        try:
            login, password = members.rotate(conn, collab, member_name)
        except members.MemberError as exc:
            fail(str(exc), 2)
    path = out_path or runtime.settings.home / "members" / collab / f"{member_name}.json"
    _write_credentials(path, collab, member_name, login, _member_url(runtime, login, password, host, port))
    out.print(f"{member_name} of {collab}: new password for {login}; credentials in {path}", markup=False, soft_wrap=True)


@member.command("revoke")
@click.argument("collab")
@click.argument("member_name", metavar="MEMBER")
def member_revoke(collab: str, member_name: str) -> None:
    """Drop MEMBER's login: it can no longer connect (open sessions end); its requests and answers stay in the audit."""
    from ..lib.database import connect
    from ..store import members

    runtime = _runtime()
    with connect(runtime.warehouse.url()) as conn:
        try:
            login = members.revoke(conn, collab, member_name)
        except members.MemberError as exc:
            fail(str(exc), 2)
    default = runtime.settings.home / "members" / collab / f"{member_name}.json"
    default.unlink(missing_ok=True)
    out.print(f"{member_name} of {collab}: login {login} revoked", markup=False)


@member.command("list")
@click.argument("collab")
@format_option()
def member_list(collab: str, fmt: str) -> None:
    """The member logins of COLLAB."""
    from ..lib.database import connect
    from ..store import members

    runtime = _runtime()
    loaded = _collaboration(runtime, collab, approvals=False)
    with connect(runtime.warehouse.url()) as conn:
        logins = {m.member: m for m in members.listing(conn, collab)}
    rows = [{"member": name, "login": m.login if m else None, "created_at": m.created_at.isoformat() if m else None,
             "rotated_at": m.rotated_at.isoformat() if m and m.rotated_at else None}
            for name, m in ((name, logins.get(name)) for name in loaded.collaboration.members)]

    def table() -> None:
        shown = Table(title=f"{collab}: member logins", title_justify="left")
        for column in ("member", "login", "made", "password rotated"):
            shown.add_column(column)
        for r in rows:
            shown.add_row(r["member"], r["login"] or "(none: `dcr member add`)", (r["created_at"] or "")[:16].replace("T", " "),
                          (r["rotated_at"] or "")[:16].replace("T", " "))
        out.print(shown)

    emit(Listing(["member", "login", "created_at", "rotated_at"], rows, about={"collaboration": collab}), fmt, table=table)


@main.command()
@click.argument("collab")
@click.option("--once", is_flag=True, help="Answer what is waiting, then stop.")
def serve(collab: str, once: bool) -> None:
    """Answer COLLAB's member requests as they arrive, in this process (the member_requests sensor's loop, without the daemon).

    \b
    Example:
      dcr serve demo
    """
    from ..defs.ad_hoc import ad_hoc_definitions
    from ..defs.member_requests import serve as serve_loop
    from ..defs.release import release_definitions
    from ..lib.naming import job_names
    from ..lib.policy import PolicyError, load_collaboration
    from ..runner import materialize
    from ..store import member_requests

    runtime = _runtime()
    loaded = _collaboration(runtime, collab, approvals=False)
    unapproved = None
    try:
        loaded = load_collaboration(loaded.folder)
    except PolicyError as exc:  # not approved yet: the members' approvals are what it waits for (nothing else is answered)
        unapproved = str(exc.issues[0])
        err.print(f"note: {collab} is not approved by every party yet ({unapproved}); answering approvals only", markup=False, soft_wrap=True)
    url = runtime.warehouse.url()
    names = job_names(collab)
    cache: dict[tuple[str, int], Any] = {}

    def defs_for(job: str, current: Any) -> Any:
        if (job, id(current)) not in cache:
            cache[(job, id(current))] = (ad_hoc_definitions(current, url) if job == names["ad_hoc"] else
                                         release_definitions(current, runtime.settings, url) if job == names["releases"] else
                                         _definitions(runtime))  # an upload's ingest: the whole collaboration
        return cache[(job, id(current))]

    def log(run: Any, outcome: Any) -> None:
        what = "answered" if outcome.success else ("refused" if outcome.refused else "failed")
        err.print(f"request #{run.tags['dcr/request']} of {run.tags['dcr/member']}: {what} (run {outcome.run_id})", markup=False, soft_wrap=True)

    idle = {"seen": False}

    def stop() -> bool:
        if once and idle["seen"]:
            return True
        idle["seen"] = True
        return False

    def ready(recovered: list[int]) -> None:
        if recovered:
            err.print(f"{plural(len(recovered), 'request')} failed ({', '.join(f'#{r}' for r in recovered)}): the `dcr serve` answering "
                      "had stopped before it answered (their members are told to ask again)", markup=False, soft_wrap=True)
        err.print(f"answering {collab}'s member requests (Ctrl-C stops)" if not once else f"answering {collab}'s waiting member requests",
                  markup=False)

    try:
        for _ in serve_loop(defs_for, loaded, url, _instance(), lambda *a, **k: materialize(*a, stdout_log=_run_log(), **k),
                            runtime.settings.landing, stop=stop, log=log, unapproved=unapproved, ready=ready):
            idle["seen"] = False
    except member_requests.Busy as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return


# --- the member's side ------------------------------------------------------------------------------------------------

def credentials(path: Path | None) -> dict[str, str] | None:
    """The member login to act as: ``--credentials FILE``, else DCR_MEMBER_URL (with DCR_MEMBER_COLLABORATION unknown), else None."""
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            fail(f"--credentials {path}: no such file (the operator writes it with `dcr member add`)", 2)
        except (OSError, ValueError) as exc:
            fail(f"--credentials {path}: not a credentials file ({exc})", 2)
        if not isinstance(data, dict) or not {"url", "collaboration", "member"} <= set(data):
            fail(f"--credentials {path}: not a credentials file (expected url, collaboration and member)", 2)
        return {k: str(v) for k, v in data.items()}
    url = os.environ.get(MEMBER_URL)
    return {"url": url} if url else None


def ask(creds: dict[str, str], collab: str, kind: str, payload: dict[str, Any], timeout_s: float = 600.0) -> Any:
    """Submit a request as the member login and wait for its answer; the request row (answered), or one error line."""
    from ..store import member_requests

    if creds.get("collaboration") and creds["collaboration"] != collab:
        fail(f"these credentials are {creds.get('member')}'s of {creds['collaboration']}, not of {collab}", 2)

    def progress(request: Any) -> None:
        what = "waiting for the operator's Dagster" if request.state == "pending" else f"running (run {request.run_id})"
        err.print(f"request #{request.id}: {what}...", markup=False)

    try:
        done = member_requests.ask(creds["url"], collab, kind, payload, timeout_s, progress if sys.stderr.isatty() else None, note=_note)
    except member_requests.Unreachable as exc:
        fail(str(exc), INFRASTRUCTURE)
    except member_requests.RequestError as exc:
        fail(str(exc))
    if done.state == "refused":
        fail(done.reason or "refused")
    if done.state == "failed":
        fail(f"request #{done.id} failed: {done.reason}")
    return done


def _note(message: str) -> None:
    err.print(f"note: {message}", markup=False, soft_wrap=True)


def refuse_as(party: str | None, creds: dict[str, str] | None) -> None:
    if party and creds:
        fail("--member is the operator's, with no credentials: a member login acts as its own member only; drop --member", 2)


@main.command()
@click.argument("collab")
@click.argument("dataset")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="Your credentials file (`dcr member add`); "
              "or set DCR_MEMBER_URL.")
def upload(collab: str, dataset: str, file: Path, credentials_path: Path | None) -> None:
    """(A member) send FILE as the next file of your DATASET: streamed over your login into its upload queue, validated
    and loaded by the operator's Dagster; prints the decision. No shared folder is needed.

    \b
    Example:
      dcr upload demo purchases ./purchases.csv --credentials retailer.json
    """
    from ..store import member_requests

    creds = credentials(credentials_path)
    if not creds:
        fail("`dcr upload` is a member's command: give --credentials FILE (or set DCR_MEMBER_URL); the operator uploads with `dcr ingest`", 2)
    if creds.get("collaboration") and creds["collaboration"] != collab:
        fail(f"these credentials are {creds.get('member')}'s of {creds['collaboration']}, not of {collab}", 2)
    if not file.exists():
        fail(f"{file}: no such file", 2)
    if not file.is_file():
        fail(f"{file}: not a regular file (a directory, pipe or device cannot be uploaded)", 2)

    def progress(request: Any) -> None:
        err.print(f"request #{request.id}: {'waiting for the operator' if request.state == 'pending' else 'validating and loading'}...", markup=False)

    try:
        done = member_requests.send_file(creds["url"], collab, dataset, file, 3600.0, progress if sys.stderr.isatty() else None, note=_note)
    except member_requests.Unreachable as exc:
        fail(str(exc), INFRASTRUCTURE)
    except member_requests.RequestError as exc:
        fail(str(exc))
    if done.state != "answered":
        fail(done.reason or f"upload {done.state}")
    answer = done.answer or {}
    where = f"{collab}/{done.member}/{answer.get('dataset', dataset)}"
    if answer.get("state") == "duplicate":
        out.print(f"{where}: upload #{answer['upload']} unchanged (already loaded): {answer.get('reason')}", markup=False)
    else:
        out.print(f"{where}: upload #{answer['upload']} accepted as version {answer.get('version')}, {answer.get('rows') or 0:,} rows", markup=False)
