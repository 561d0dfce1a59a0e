"""`dcr db` and `dcr ui`: the database and the Dagster UI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.table import Table

from ..lib.text import plural
from ._common import INFRASTRUCTURE, _collaboration, _definitions, _runtime, fail, main, out
from ._output import Listing, emit, format_option


@main.group()
def db() -> None:
    """The database in use."""


@db.command("url")
def db_url() -> None:
    """Print the connection URL of the clean-room database (password hidden).

    \b
    Example:
      DCR_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/cleanroom dcr db url
    """
    out.print(_runtime().warehouse.redacted(), markup=False, soft_wrap=True)


@db.command("listen")
@click.option("--port", help="The TCP port member logins connect to; `auto`: the one it listens on already, else the first free from 5433.")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on (0.0.0.0: every interface).")
@click.option("--off", is_flag=True, help="Listen on the socket only again.")
def db_listen(port: str | None, host: str, off: bool) -> None:
    """Let member logins reach the embedded PostgreSQL over TCP (SCRAM-SHA-256 passwords; nobody else is admitted over TCP).

    The server restarts to listen (running commands lose their connections; restart `dcr ui`). It keeps listening at
    every later start until `--off`. An external database's own pg_hba.conf and listen_addresses decide this instead.

    \b
    Example:
      dcr db listen --port 5433
    """
    from ..lib.database import EmbeddedServerError, listen, listening
    from ..lib.settings import Settings

    settings = Settings.from_env()
    if settings.external_database_url:
        fail("the database is external (DCR_DATABASE_URL): let member logins in with its own listen_addresses and pg_hba.conf "
             "(the lines to add are in the README, Members)", 2)
    if not off and port is None:
        fail("give --port PORT (or --port auto, or --off)", 2)
    number: int | None = None
    if port == "auto":
        current = listening(settings.home)
        number = current[1] if current else _first_free(host, 5433)
    elif port is not None and not port.isdigit():
        fail(f"--port {port!r}: a port number or auto", 2)
    elif port is not None:
        number = int(port)
    try:
        listen(settings.home, None if off else host, None if off else number)
    except EmbeddedServerError as exc:
        fail(str(exc), INFRASTRUCTURE)
    out.print("embedded PostgreSQL: socket only" if off else f"embedded PostgreSQL: listening on {host}:{number} for member logins "
              "(SCRAM-SHA-256; no TLS: reach it over a VPN or an SSH tunnel across networks)", markup=False, soft_wrap=True)


def _first_free(host: str, start: int) -> int:
    import socket

    for port in range(start, start + 100):
        with socket.socket() as probe:
            if probe.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) != 0:  # noqa: S104 (compared, not bound)
                return port
    fail(f"no free port from {start} to {start + 99} on {host}: give --port", 2)


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL of this deployment (DCR_HOME); no effect on an external database.

    \b
    Example:
      dcr db stop && rm -rf .dcr
    """
    from ..lib.database import stop_embedded
    from ..lib.settings import Settings

    home = Settings.from_env().home
    out.print("embedded PostgreSQL stopped" if stop_embedded(home) else f"no embedded PostgreSQL running under {home}")


@db.command("migrate")
@click.option("--status", "show_status", is_flag=True, help="Only list the migrations already applied.")
def db_migrate(show_status: bool) -> None:
    """Apply the pending schema migrations (dcr_pipelines/store/migrations) to every collaboration's schemas.

    \b
    Each store function also applies its own scope's pending migrations on
    first use; run this before a deployment to do it all at once.
    Examples:
      dcr db migrate
      dcr db migrate --status
    """
    from ..lib import naming
    from ..lib.database import connect
    from ..lib.policy import check_policies
    from ..lib.settings import Settings
    from ..store import migrations

    runtime = _runtime()
    with connect(runtime.warehouse.url()) as conn:
        if not show_status:
            loaded, issues = check_policies(Settings.from_env().policies)
            names = sorted(lc.name for lc in loaded)
            try:
                applied = migrations.migrate(conn, {"results": [naming.results_schema(c) for c in names],
                                                    "analysis": [naming.analysis_schema(c) for c in names],
                                                    "matching": [naming.matching_schema(c) for c in names]})
            except migrations.MigrationError as exc:
                fail(str(exc), 2)
            for a in applied:
                out.print(f"applied {a.scope} {a.version:04d}_{a.name}", markup=False)
            out.print(f"schema up to date ({plural(len(applied), 'migration')} applied now)")
            if issues:  # the collaborations that did not load were not migrated: say so, and fail
                fail(f"{plural(len(issues), 'policy mistake')}: those collaborations were not migrated; first: {issues[0]} (run `dcr policy check`)", 2)
            return
        for scope_name, version, name, applied_at in migrations.status(conn):
            out.print(f"{scope_name}\t{version:04d}_{name}\t{applied_at[:19]}", markup=False, soft_wrap=True)


@db.command("roles")
@click.argument("collab")
@format_option()
def db_roles(collab: str, fmt: str) -> None:
    """Print the role x schema privilege matrix of COLLAB, read back from the database.

    \b
    Cells: write (create/insert), read (select on every table), read N/M
    (select on some tables), usage (schema only), - (nothing).
    Example:
      dcr db roles demo
    """
    from ..lib.database import connect
    from ..store import access

    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    with connect(runtime.warehouse.url()) as conn:
        grid = access.matrix(conn, loaded)
    schemas = access.schemas(loaded)
    rows = [{"role": role, **{schema: grid[role][schema].cell() for schema in schemas}} for role in grid]

    def table() -> None:
        shown = Table(title=f"roles x schemas of {collab} (from the database)", title_justify="left")
        shown.add_column("role")
        for schema in schemas:
            shown.add_column(schema.removeprefix(f"{collab}_"))
        for row in rows:
            shown.add_row(row["role"].removeprefix(f"dcr_{collab}_"), *(row[s] for s in schemas))
        out.print(shown)
        out.print(ROLES_LEGEND, markup=False, soft_wrap=True)

    emit(Listing(["role", *schemas], rows, notes=[ROLES_LEGEND], about={"collaboration": collab}), fmt, table=table)


ROLES_LEGEND = ("cells: write = may create tables and write every table; read = may select every table; "
                "read N/M = may select N of the schema's M tables (e.g. only the releases it receives); "
                "usage = may see the schema but read no table; - = nothing. Roles are dcr_<collab>_<name>, schemas <collab>_<name>.")


@db.command("drop")
@click.argument("collab")
@click.option("--yes", is_flag=True, help="Drop without asking (required when not on a terminal).")
def db_drop(collab: str, yes: bool) -> None:
    """Remove COLLAB from the database: its schemas, its server-wide roles (dcr_COLLAB_*) and its dcr_meta rows.

    \b
    Roles outlive a dropped database; this removes them. Dagster's run
    history and the files under DCR_HOME (landing, exports) are kept. The
    policy folder is not touched: while it exists, the next `dcr run COLLAB`
    creates everything again.
    Example:
      dcr db drop demo --yes
    """
    import re

    from ..lib.database import connect
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.policy.models import NAME_PATTERN
    from ..store import teardown

    if not re.fullmatch(NAME_PATTERN, collab):
        fail(f"{collab!r} is not a collaboration name: lowercase letters, digits and _ only", 2)
    runtime = _runtime()
    policies = runtime.settings.policies
    folder = policies / collab
    parties: list[str] = []
    if (folder / "collaboration.yaml").is_file():
        try:
            parties = list(load_collaboration(folder).parties())
        except PolicyError:
            parties = []  # a broken policy does not stop the drop: parties are found by the schemas' names
    others = [p.name for p in policies.iterdir() if (p / "collaboration.yaml").is_file()] if policies.is_dir() else []
    with connect(runtime.warehouse.url()) as conn:
        planned = teardown.plan(conn, collab, parties, others)
        if planned.empty:
            if folder.is_dir():
                out.print(f"nothing of {collab} in the database {runtime.warehouse.redacted()}: no schema, role or bookkeeping to drop",
                          markup=False, soft_wrap=True)
                return
            fail(f"no collaboration {collab!r}: nothing of it in the database and no folder under {policies}", 2)
        rows = sum(planned.meta_rows.values())
        what = (f"{plural(len(planned.schemas), 'schema')} ({', '.join(planned.schemas) or '-'}), "
                f"{plural(len(planned.roles), 'role')} ({', '.join(planned.roles) or '-'}) and {plural(rows, 'bookkeeping row')} of {collab}")
        if not yes:
            if not sys.stdin.isatty():
                fail(f"dcr db drop {collab} would drop {what}, with every table and release in them: add --yes to confirm "
                     "(not asked: no terminal)", 2)
            click.confirm(f"drop {what}? Releases, the budget ledger and the audit chain in them are lost", abort=True)
        done = teardown.drop(conn, planned)
    out.print(f"{collab}: dropped {plural(len(done.schemas), 'schema')}, {plural(len(done.roles), 'role')} and "
              f"{plural(done.meta_rows, 'bookkeeping row')}", markup=False, soft_wrap=True)
    for role, why in done.kept_roles.items():
        out.print(f"warning: role {role} kept: {why} (run `dcr db drop {collab}` against that database too)", markup=False, soft_wrap=True)
    if folder.is_dir():
        out.print(f"note: {folder} is still there: the next `dcr run {collab}` creates the collaboration again; remove the folder "
                  "(through git) to retire it", markup=False, soft_wrap=True)

@main.command()
@click.option("--port", default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui(port: int, host: str) -> None:
    """Start the Dagster UI (dg dev) on the same database; it reloads its definitions when the policies change.

    \b
    Example:
      dcr ui --port 3000
    """
    runtime = _runtime()
    _definitions(runtime)  # prepares the manifest and development secrets before the code server starts
    from ..lib.settings import PROJECT_ROOT

    dg_bin = Path(sys.executable).with_name("dg")
    out.print(f"Dagster UI on http://{host}:{port} (Ctrl-C to stop); storage: {runtime.dagster_url.split('?')[0]}", markup=False)
    os.chdir(PROJECT_ROOT)
    if (PROJECT_ROOT / ".env").is_file() and runtime.settings.home.resolve().is_relative_to(PROJECT_ROOT):
        os.environ.pop("DAGSTER_HOME", None)  # .env names it (see record_in_dotenv); exported too, `dagster dev` warns about dagster.yaml
    from ..lib.processes import run_process_tree
    from ._ui_reload import watch

    watch(runtime.settings.policies, host, port)  # a changed or new policy folder shows without "Reload definitions"
    out.print(f"watching {runtime.settings.policies}: the UI reloads its definitions when a policy changes", markup=False)
    # not exec: dg dev leaves its webserver, daemon and code servers behind on SIGTERM; this process stops them all
    sys.exit(run_process_tree([str(dg_bin), "dev", "--host", host, "--port", str(port)]))
