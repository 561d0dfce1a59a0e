"""Shared by every command group: the consoles, `fail`, the runtime and definitions, printing of releases."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(file=sys.stderr, highlight=False)


class _MemberOption(click.Option):
    """``--member NAME``, the one name of a member in every command; the names some commands had before (``--as``,
    ``--party``, ``--consumer``) still work but are not listed."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        return None if record is None else ("--member NAME", record[1])


def member_option(help: str, param: str = "member", required: bool = False) -> Any:
    """The member a command acts for or shows (the operator's; a member's own login needs none)."""
    return click.option("--member", "--as", "--party", "--consumer", param, cls=_MemberOption, metavar="NAME", required=required, help=help)


INFRASTRUCTURE = 3  # exit code: the database, the disk or the file system failed; nothing was changed, run it again once fixed


def fail(message: str, code: int = 1) -> NoReturn:
    if code == 1 and database_lost(message):
        code = INFRASTRUCTURE  # a step failed because the server went away: the infrastructure, not the request
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


_LOST = ("server closed the connection", "terminating connection", "connection refused", "could not connect to server",
         "connection to server", "the database system is shutting down", "the database system is starting up", "no connection to the server",
         "consuming input failed", "connection is lost", "connection already closed", "admin_shutdown", "adminshutdown", "57p01", "08006", "08001")


def database_lost(text_or_exc: object) -> bool:
    """Whether an error (or any exception it was raised from) says the database server went away or could not be reached."""
    seen = 0
    exc = text_or_exc if isinstance(text_or_exc, BaseException) else None
    texts = [str(text_or_exc)] if exc is None else []
    while exc is not None and seen < 20:
        texts.append(f"{type(exc).__name__} {exc}")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return any(marker in text.lower() for text in texts for marker in _LOST)


def _runtime() -> Any:
    from ..lib.database import EmbeddedServerError
    from ..lib.runtime import activate, record_in_dotenv

    try:
        runtime = activate()
        record_in_dotenv(runtime.settings)  # Dagster's own tools (dg dev, dagster asset ...) find this deployment
        return runtime
    except EmbeddedServerError as exc:
        fail(str(exc), INFRASTRUCTURE)
    except ValueError as exc:  # a malformed DCR_DATABASE_URL / DCR_DAGSTER_DATABASE_URL
        fail(f"{exc}: set DCR_DATABASE_URL to postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or unset it for the embedded server", 2)
    except PermissionError as exc:
        fail(f"permission denied on {exc.filename}: DCR_HOME must be writable by this user (or point DCR_HOME elsewhere)", INFRASTRUCTURE)
    except OSError as exc:
        fail(f"{exc.strerror or exc} ({exc.filename or 'DCR_HOME'}): free space or fix the permissions there, then run it again", INFRASTRUCTURE)


def _definitions(runtime: Any) -> Any:
    from ..definitions import build_definitions, secret_names
    from ..lib.runtime import development_secrets_allowed, ensure_development_secrets, missing_secrets

    names = secret_names(runtime.settings)
    if development_secrets_allowed(runtime.embedded):
        ensure_development_secrets(runtime.settings.home, names)
    missing = missing_secrets(names)
    if missing:
        fail(f"secret {missing[0]} is not set{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: with an external database, "
             "secrets come from the environment only; set it, or DCR_DEV_SECRETS=1 for throw-away ones (docs/operations.md, Secrets)", 2)
    return build_definitions(runtime.settings)


def _run_log() -> Path:
    from ..lib.settings import Settings

    return Settings.from_env().home / "logs" / "runs.log"


def _instance() -> Any:
    import dagster as dg

    from ..runner import fail_orphaned_runs

    instance = dg.DagsterInstance.get()
    for run_id in fail_orphaned_runs(instance):
        err.print(f"note: run {run_id} was left unfinished by a process that died; marked failed", markup=False, soft_wrap=True)
        _export_what_it_committed(instance, run_id)
    return instance


def _export_what_it_committed(instance: Any, run_id: str) -> None:
    """A release committed by a run killed before its exports gets its files now, at the next command."""
    run = instance.get_run_by_id(run_id)
    collab = run.tags.get("dcr/collaboration") if run is not None else None
    if not collab or not os.environ.get("DCR_WAREHOUSE_URL"):
        return
    from ..lib.database import connect
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.settings import Settings
    from ..services.release import export_committed_by

    settings = Settings.from_env()
    try:
        loaded = load_collaboration(settings.policies / collab)
    except PolicyError:
        return
    with connect(os.environ["DCR_WAREHOUSE_URL"]) as conn:
        for release_id in export_committed_by(conn, loaded, run_id, settings.exports):
            err.print(f"note: release {release_id} was committed by that run before its export files were written; they are written now",
                      markup=False, soft_wrap=True)


def _collaboration(runtime: Any, name: str, approvals: bool = True) -> Any:
    import re

    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.policy.models import NAME_PATTERN

    if not re.fullmatch(NAME_PATTERN, name):
        fail(f"{name!r} is not a collaboration name: lowercase letters, digits and _ only, as the folder under {runtime.settings.policies}", 2)
    folder = runtime.settings.policies / name
    try:
        return load_collaboration(folder, approvals=approvals)
    except PolicyError as exc:
        first = exc.issues[0]
        if not folder.is_dir():
            fail(f"no collaboration {name!r} under {runtime.settings.policies}", 2)
        fail(f"{first}" + (f" (and {len(exc.issues) - 1} more; run `dcr policy check`)" if len(exc.issues) > 1 else ""), 2)


def usage_line(exc: click.UsageError) -> str:
    """Click's usage error as the one line every `dcr` error is: the cause, then where the command's help is."""
    names: list[str] = []
    ctx = exc.ctx
    while ctx is not None and ctx.parent is not None:  # the root's name is however dcr was started (python -m ...)
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    message = " ".join(exc.format_message().split()).removesuffix(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    return f"{message} (see `{' '.join(['dcr', *reversed(names)])} --help`)"


class DcrGroup(click.Group):
    """The `dcr` group: a usage mistake (missing option, unknown flag, bad value) is one `error:` line and exit code 2,
    not click's usage block; `--help` and a group called without its command still print the help."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import logging

        # Libraries' warnings to the root logger (Dagster's storage retries when the database goes away, dozens of lines)
        # are not for the terminal: dcr prints one line per outcome; the run's own events are in Dagster's event log.
        if not logging.getLogger().handlers:
            logging.getLogger().addHandler(logging.NullHandler())
        try:
            code = super().main(args, prog_name or "dcr", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `dcr db`: the group's help, as click prints it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            fail(usage_line(exc), 2)
        except click.ClickException as exc:
            fail(" ".join(exc.format_message().split()), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except Exception as exc:
            if database_lost(exc):  # the server went away mid-command: one line, not the traceback of every layer above it
                fail("the connection to the database was lost during the command; what the last completed step committed is kept "
                     "and nothing half done was recorded: check the database (`dcr db url`) and run the command again", INFRASTRUCTURE)
            raise
        # Without standalone mode click returns the command's value, or the code of a ctx.exit() (e.g. after --help).
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=DcrGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """An open-source data clean room.

    \b
    Examples:
      dcr demo --rows 10000            set up and run the demo collaboration
      dcr policy check                 lint every collaboration under policies/
      dcr release demo campaign_reach --param since=2026-03-01
      dcr budget demo
    """


def _run_collaboration(defs: Any, loaded: Any, params: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    import os

    from ..lib.settings import Settings
    from ..runner import analysis_run_config, collaboration_keys, ingest_uploads, materialize

    with out.status(f"processing {loaded.name}'s appended uploads..."):
        for done in ingest_uploads(defs, loaded, Settings.from_env().landing, os.environ["DCR_WAREHOUSE_URL"], instance=_instance(),
                                   stdout_log=_run_log()):
            if not done.success:  # a refused file is the party's to fix, not a failed pipeline
                out.print(f"warning: {done.failure}", markup=False)
    from ..defs import freshness
    from ..lib.database import connect

    with connect(os.environ["DCR_WAREHOUSE_URL"]) as conn:  # a version a dead command did not record: recorded, so staging rebuilds it
        for k in freshness.record_missing(_instance(), conn, loaded, Settings.from_env().landing):
            out.print(f"note: {k}: the warehouse's current version was missing from the event log (a command stopped before recording it); "
                      "recorded now", markup=False, soft_wrap=True)
    keys = collaboration_keys(defs, loaded.name)
    with out.status(f"materializing {len(keys)} assets of {loaded.name} through Dagster..."):
        outcome = materialize(
            defs, keys, instance=_instance(), run_config=analysis_run_config(loaded.name, params or {}), stdout_log=_run_log()
        )
    if outcome.waiting:  # an expected state, not a failure: the psi_answers sensor (or the next `dcr run`) goes on from here
        out.print(f"run {outcome.run_id} is waiting at matching (the run succeeded; analyses wait for the match): {outcome.failure}",
                  markup=False, soft_wrap=True)
        return {}
    if not outcome.success:
        fail(f"run {outcome.run_id} failed: {outcome.failure}")
    out.print(f"run {outcome.run_id}: {len(outcome.metadata)} assets materialized (event log: `make ui` or `dcr audit {loaded.name}`)")
    _print_identifier_quality(loaded)
    return outcome.metadata


def _print_identifier_quality(loaded: Any) -> None:
    """Per dataset and identifier column: how many were accepted and refused (by reason); a warning above the column's
    max_invalid_fraction. (The operator's view; each member's report shows its own datasets.)"""
    import os

    from ..lib.database import connect
    from ..lib.text import plural
    from ..store import stages

    with connect(os.environ["DCR_WAREHOUSE_URL"]) as conn:
        counts = stages.staging_counts(conn, loaded)
    for line in stages.identifier_quality(loaded, counts):
        text = (f"identifiers {line.dataset}.{line.column}: {line.accepted:,} accepted, {plural(line.refused, 'refused', 'refused')}"
                + (f" ({', '.join(f'{reason} {n:,}' for reason, n in line.reasons.items())})" if line.reasons else "")
                + (f"; {line.changed:,} of those accepted changed by normalisation" if line.changed is not None else ""))
        out.print(text, markup=False, soft_wrap=True)
        if line.above:
            err.print(f"warning: {line.dataset}.{line.column}: {line.share:.1%} of its identifiers were refused, above max_invalid_fraction "
                      f"{line.limit:g}; those people cannot match: ask {line.owner} to fix the export (docs/identifiers.md)",
                      markup=False, soft_wrap=True)


def _release_all(defs: Any, loaded: Any) -> dict[str, str]:
    """Release every approved query with its default parameters (what `dcr demo` asks for); the release of each query."""
    from ..runner import materialize, release_keys

    keys = release_keys(defs, loaded.name)
    if not keys:
        return {}
    with out.status(f"releasing {len(keys)} approved quer{'y' if len(keys) == 1 else 'ies'} through Dagster..."):
        outcome = materialize(defs, keys, instance=_instance(), stdout_log=_run_log())
    if not outcome.success:
        fail(f"run {outcome.run_id} failed: {outcome.failure}")
    for key, meta in outcome.metadata.items():
        if meta.get("cached"):
            out.print(f"{key}: identical release found (same query, parameters and data versions): stored result returned, no budget charged")
    return {key.rsplit("/", 1)[1]: str(meta["release_id"]) for key, meta in outcome.metadata.items() if meta.get("release_id")}


def _print_release(runtime: Any, loaded: Any, query_name: str, release_id: str | None = None) -> None:
    from ..lib import naming
    from ..lib.database import connect
    from ..services.release import consumer_budget
    from ..store import results
    from ..store.ledger import budget_status

    query = loaded.queries[query_name]
    schema = naming.results_schema(loaded.name)
    with connect(runtime.warehouse.url()) as conn:
        stored = results.latest_release(conn, loaded.name, query_name, release_id)
        if stored is None:
            out.print(f"{query_name}: nothing released yet")
            return
        thresholded = query.spec.rule == "threshold"
        status = None if thresholded else budget_status(conn, schema, consumer_budget(loaded, query.spec.consumer))
    from ..lib.presentation import release_table

    rid, rows, epsilon, params = stored.release_id, stored.rows, stored.epsilon, stored.params
    shown = release_table(query.spec, rows)
    out.print(f"{loaded.name}/{query_name}, release {rid}, params {json.dumps(params)}", markup=False, soft_wrap=True)
    table = Table()
    for i, header in enumerate(shown.headers):
        table.add_column(header, justify="right" if i >= len(query.spec.dimensions) else "left")
    for row in shown.rows:
        table.add_row(*row)
    out.print(table)
    if status is None:
        out.print(f"threshold rule: exact values, groups with fewer than {query.spec.min_distinct_units} distinct people removed; no budget charged")
        return
    out.print(
        f"epsilon of this release: {epsilon:.3g}; {query.spec.consumer} has now spent {status.spent:.3g} "
        f"and has {status.remaining:.3g} of {status.total:.3g} left"
        + (f" (rolling {status.period_days}-day window)" if status.period_days else ""),
        soft_wrap=True,
    )


def _release_rows(runtime: Any, loaded: Any, query_name: str, release_id: str) -> list[dict[str, Any]]:
    from ..lib.database import connect
    from ..store import results

    with connect(runtime.warehouse.url()) as conn:
        return results.release_rows(conn, loaded.name, release_id)


def _print_releases(runtime: Any, loaded: Any, releases: dict[str, str] | None = None) -> None:
    """Each query's release: the one this command asked for (``releases``), else the newest."""
    for query_name in loaded.queries:
        _print_release(runtime, loaded, query_name, (releases or {}).get(query_name))


# --- policy ------------------------------------------------------------------------


def _print_overlap(runtime: Any, loaded: Any, fmt: str = "table") -> None:
    from ..lib.database import connect
    from ..store import results
    from ._output import Listing, emit

    collab = loaded.name
    mode = loaded.collaboration.matching.overlap_release
    columns = ["release_id", "matched_people", "ci_low", "ci_high"]
    about = {"collaboration": collab, "overlap_release": mode}
    if mode == "withheld":
        note = f"{collab}: the overlap is withheld by policy (matching.overlap_release: withheld)"
        emit(Listing(columns, [], notes=[note], about=about | {"status": "withheld by policy"}), fmt, table=lambda: out.print(note))
        return
    with connect(runtime.warehouse.url()) as conn:
        rows = [{"release_id": r.release_id, "matched_people": round(r.matched_people),  # a count of people: a whole number
                 "ci_low": None if r.ci_low is None else round(r.ci_low, 2), "ci_high": None if r.ci_high is None else round(r.ci_high, 2)}
                for r in results.overlap_releases(conn, collab)]
    notes = [] if rows else [f"{collab}: no overlap released yet (run the matching stage)"]
    if mode == "exact":
        title = f"shared people in {collab} (exact: the analysis rules let members count them)"
    else:
        title = f"shared people in {collab} (DP, epsilon {loaded.collaboration.matching.overlap_epsilon} each)"

    def table() -> None:
        if not rows:
            out.print(notes[0])
            return
        grid = Table(title=title, title_justify="left")
        for column in ("release", "matched people", "95% interval"):
            grid.add_column(column)
        for r in rows:
            grid.add_row(str(r["release_id"]), f"{r['matched_people']:,.0f}", "exact" if r["ci_low"] is None else f"[{r['ci_low']:,.0f}, {r['ci_high']:,.0f}]")
        out.print(grid)

    emit(Listing(columns, rows, notes=notes, about=about | {"status": "released" if rows else "none released yet"}), fmt, table=table)
