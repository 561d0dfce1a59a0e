"""`dcr query`: check and run ad-hoc SQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import _collaboration, _instance, _run_log, _runtime, err, fail, main, member_option, out
from ._output import Listing, emit, format_option, text_only


@main.group()
def query() -> None:
    """Ad-hoc SQL under the analysis rules."""


def _known_member(loaded: Any, party: str) -> None:
    """An unknown --member is a usage mistake (exit 2), not a refusal by the rules."""
    members = loaded.collaboration.members
    if party not in members:
        fail(f"{loaded.name} has no member {party!r} (members: {', '.join(members)}); give one of them with --member", 2)


@query.command("check")
@click.argument("collab")
@member_option("The operator, checking for a member (a member's own login needs no --member).", param="party")
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="A member's credentials file (`dcr member add`); "
              "or set DCR_MEMBER_URL.")
@click.argument("sql_text", metavar="SQL")
def query_check(collab: str, party: str | None, credentials_path: Path | None, sql_text: str) -> None:
    """Check ad-hoc SQL against every rule of the datasets it reads; run nothing.

    Prints "ok" with the tables and rules involved, or the refusal naming the
    rule and the offending part of the query (exit code 1).

    \b
    Example:
      dcr query check demo --member ad_network "select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers
        from impressions as i inner join customers as c on c.customer_email = i.user_email group by 1, 2"
    """
    from ..lib import ad_hoc
    from ..lib.policy import PolicyError, load_collaboration
    from ..lib.settings import Settings
    from .member import ask, credentials, refuse_as

    creds = credentials(credentials_path)
    refuse_as(party, creds)
    if creds:
        done = ask(creds, collab, "query_check", {"sql": sql_text})
        out.print("ok")
        for line in done.answer["summary"]:
            out.print(f"  {line}", markup=False)
        return
    if not party:
        raise click.UsageError("missing option '--member' (the operator, for a member) or '--credentials FILE' (a member's own login)")
    settings = Settings.from_env()
    folder = settings.policies / collab
    if not folder.is_dir():
        fail(f"no collaboration {collab!r} under {settings.policies}", 2)
    try:
        loaded = load_collaboration(folder)
    except PolicyError as exc:
        fail(str(exc.issues[0]), 2)
    _known_member(loaded, party)
    try:
        checked = ad_hoc.check(loaded, party, sql_text)
    except ad_hoc.QueryRefused as exc:
        fail(str(exc))
    out.print("ok")
    for line in checked.summary():
        out.print(f"  {line}", markup=False)


@query.command("run")
@click.argument("collab")
@member_option("The operator, running for a member (a member's own login needs no --member).", param="party")
@click.option("--credentials", "credentials_path", type=click.Path(path_type=Path), help="A member's credentials file (`dcr member add`); "
              "or set DCR_MEMBER_URL.")
@format_option()
@click.option("--dry-run", is_flag=True, help="Check the query and show what it would cost (epsilon, budget left, daily cap); run nothing.")
@click.argument("sql_text", metavar="SQL")
def query_run(collab: str, party: str | None, credentials_path: Path | None, fmt: str, dry_run: bool, sql_text: str) -> None:
    """Check, rewrite and run ad-hoc SQL through Dagster; print the result.

    Under a differential_privacy rule the answer is noised (each noised
    aggregate with its 95% interval) and charged to the runner's budget; an
    identical query over the same data is answered from the store, free.
    Under an aggregation rule it is exact and thresholded. Every run is
    recorded in the event log and the audit chain, refused or not (`dcr audit`).

    \b
    Example:
      dcr query run demo --member ad_network "select c.loyalty_tier, count(distinct c.customer_email) as buyers,
        round(avg(c.lifetime_value), 2) as avg_value from impressions as i
        inner join customers as c on c.customer_email = i.user_email group by c.loyalty_tier"
    """
    from ..lib import naming
    from ..lib.database import connect
    from ..runner import ad_hoc_run_config, materialize
    from ..services import ad_hoc as ad_hoc_service
    from .member import ask, credentials, refuse_as

    if dry_run:
        text_only(fmt, "--dry-run")
    creds = credentials(credentials_path)
    refuse_as(party, creds)
    if creds:
        if dry_run:
            fail("--dry-run through a member login is not available yet: `dcr query check` checks the query; `dcr budget` shows what is left", 2)
        done = ask(creds, collab, "query_run", {"sql": sql_text})
        print_answer(collab, done.member, done.answer, fmt)
        return
    if not party:
        raise click.UsageError("missing option '--member' (the operator, for a member) or '--credentials FILE' (a member's own login)")
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)  # a policy mistake or unknown name stops here, exit 2
    _known_member(loaded, party)
    if dry_run:
        _dry_run(runtime, loaded, party, sql_text)
        return
    from ..defs.ad_hoc import ad_hoc_definitions, answer_of

    defs = ad_hoc_definitions(loaded, runtime.warehouse.url())  # this collaboration's ad-hoc asset only: no dbt to load
    with err.status("checking and running the query through Dagster..."):
        outcome = materialize(defs, [naming.ad_hoc_key(collab)], instance=_instance(), run_config=ad_hoc_run_config(collab, party, sql_text),
                              stdout_log=_run_log())
    if not outcome.success:
        fail(outcome.failure or "the query failed")
    with connect(runtime.warehouse.url()) as conn:
        result = ad_hoc_service.stored_result(conn, collab, party, outcome.run_id)
    print_answer(collab, party, answer_of(result, outcome.metadata.get("/".join(naming.ad_hoc_key(collab)), {}), outcome.run_id), fmt)


def print_answer(collab: str, party: str, answer: dict[str, Any], fmt: str) -> None:
    """An ad-hoc answer as `dcr query run` prints it (the same whether the operator's process or a member request ran it)."""
    notes = []
    if answer["mode"] == "dp":
        charged = ("answered from the store (an identical query over the same data), no charge" if answer.get("answered_from_store")
                   else f"charged epsilon {answer['epsilon_charged']:.4g}")
        left = (f"; {party} has {answer['epsilon_remaining']:.4g} of {answer['epsilon_budget']:.4g} left"
                if answer.get("epsilon_remaining") is not None and answer.get("epsilon_budget") is not None else "")
        notes.append(f"differential privacy: noised values with 95% intervals (_ci_low, _ci_high); {charged}{left}")
        notes.append("groups whose noised count fell under the policy's threshold are not shown; how many there were is not released "
                     "(`dcr query run --dry-run` shows the thresholds)")
    elif answer.get("min_distinct_units"):
        notes.append(f"exact: each person counts once per group; rows with fewer than {answer['min_distinct_units']} distinct people were removed")
    withheld = int(answer.get("withheld_rows") or 0) if answer["mode"] != "dp" else None
    because = list(answer.get("withheld_because") or [])
    if withheld:
        because = [f"the whole result was withheld by the difference check: {'; '.join(because)}"] if because else ["the whole result was withheld by the difference check"]
    about = {"collaboration": collab, "member": party, **{k: v for k, v in answer.items() if k not in ("columns", "rows", "withheld_rows", "withheld_because")}}
    emit(Listing(list(answer["columns"]), list(answer["rows"]), title=f"{collab}: ad-hoc query of {party} (run {str(answer['run_id'])[:8]})",
                 notes=notes, withheld=withheld, withheld_because=because, about=about), fmt)


def _dry_run(runtime: Any, loaded: Any, party: str, sql_text: str) -> None:
    """Check the query and print what it would cost against the runner's budget and daily cap; exit 1 if it does not fit."""
    from ..defs import freshness
    from ..lib import ad_hoc
    from ..lib.database import connect
    from ..services import ad_hoc as ad_hoc_service

    try:
        checked = ad_hoc.check(loaded, party, sql_text)
        with connect(runtime.warehouse.url()) as conn:
            planned = ad_hoc_service.dry_run(conn, loaded, checked, sql_text, freshness.staged(_instance(), conn, loaded))
    except ad_hoc.QueryRefused as exc:
        fail(str(exc))
    for line in checked.summary():
        out.print(line, markup=False)
    cap = f"; {planned.runs_today} of {planned.cap} ad-hoc runs in the last 24 hours" if planned.cap is not None else ""
    if planned.cap is not None and planned.runs_today >= planned.cap:
        fail(f"{party} has run {planned.cap} ad-hoc queries in the last 24 hours, the most the policy allows: nothing was run (ad_hoc.max_queries_per_day)")
    if planned.noise is None:
        out.print(f"exact mode: no privacy budget is spent{cap}", markup=False)
        return
    noise, status = planned.noise, planned.status
    assert status is not None
    for p in noise.plans:
        out.print(f"{p.column}: sensitivity {p.sensitivity:g}, laplace scale {p.scale:.4g}, epsilon {p.epsilon:.4g}, 95% accuracy +/-{p.accuracy:.4g}",
                  markup=False)
    if noise.selection is not None:
        s = noise.selection
        out.print(f"{s.metric}: key selection, laplace scale {s.scale:.4g}, threshold {s.threshold}, epsilon {s.epsilon:.4g}, delta {s.delta:.3g}",
                  markup=False)
    if planned.cached:
        out.print(f"an identical query over the same data was answered before: the stored answer is returned, free{cap}", markup=False)
        return
    cost = f"epsilon {noise.epsilon:.4g}" + (f" and delta {noise.delta:.3g}" if noise.delta else "")
    if not planned.fits:
        fail(f"the query would cost {cost}, and {party} has epsilon {status.remaining:.4g} of {status.total:.4g}"
             + (f" and delta {status.delta_remaining:.3g} of {status.delta_total:.3g}" if noise.delta else "") + " left: it does not fit, nothing was run (budget)")
    out.print(f"the query would cost {cost} of {party}'s budget: {status.remaining:.4g} of {status.total:.4g} left now, "
              f"{max(0.0, status.remaining - noise.epsilon):.4g} after it{cap}", markup=False)
