"""`dcr demo`: generate data and run a demo collaboration end to end."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import click

from ..lib.text import plural
from ._common import (
    _collaboration,
    _definitions,
    _instance,
    _print_overlap,
    _print_releases,
    _release_all,
    _run_collaboration,
    _run_log,
    _runtime,
    fail,
    main,
    out,
)


@main.command()
@click.option("--rows", default=10_000, show_default=True, help="Rows per party.")
@click.option("--overlap", default=0.3, show_default=True, help="Fraction of the retailer's customers the ad network also has.")
@click.option("--seed", default=7, show_default=True, help="Random seed of the generator.")
@click.option("--collab", default="demo", show_default=True, help="Collaboration folder to run.")
def demo(rows: int, overlap: float, seed: int, collab: str) -> None:
    """Generate both parties' uploads and run the demo collaboration end to end.

    \b
    Example:
      dcr demo --rows 100000 --overlap 0.4 --seed 1
    """
    from ..lib import demo_data

    started = time.perf_counter()
    runtime = _runtime()
    loaded = _collaboration(runtime, collab)
    at_home = [p for p in loaded.parties() if loaded.at_home(p)]
    generated_at = runtime.settings.home / "parties" / collab if at_home else runtime.settings.landing / collab
    try:
        files = demo_data.generate(generated_at, rows=rows, overlap=overlap, seed=seed)
    except ValueError as exc:
        fail(str(exc), 2)
    out.print(
        f"generated {plural(rows, 'row')} per party: {plural(files.retailer_customers, 'retailer customer')}, "
        f"{plural(files.ad_network_users, 'ad network user')}, {files.shared_people:,} shared"
    )
    if at_home:
        _demo_home_prepare(runtime, loaded, generated_at)
    else:
        _split_appended(loaded, generated_at)
    out.print(f"database: {runtime.warehouse.redacted()}")
    defs = _definitions(runtime)
    if at_home and not _run_collaboration(defs, loaded):
        _demo_home_respond(runtime, loaded, generated_at)
        _run_collaboration(defs, loaded)
    elif not at_home:
        _run_collaboration(defs, loaded)
    logins = _members_sign_in(runtime, loaded) if _shows_ad_hoc(loaded) else None  # before any release: their approvals count
    released = _release_all(defs, loaded)  # the demo asks for every release explicitly, with the default parameters
    _print_releases(runtime, loaded, released)
    if _shows_ad_hoc(loaded):
        _example_ad_hoc(runtime, defs, loaded, logins)
    if loaded.collaboration.matching.overlap_release != "withheld":
        _print_overlap(runtime, loaded)
    out.print(f"done in {time.perf_counter() - started:.1f}s; open the asset graph with `make ui`")


def _split_appended(loaded: Any, generated_at: Path) -> None:
    """An append-mode dataset arrives as two exports (each adds its rows), as a party would send them month by month."""
    for name, ds in loaded.collaboration.datasets.items():
        source = generated_at / ds.owner / name / f"{name}.csv"
        if ds.mode != "append" or not source.exists():
            continue
        header, *lines = source.read_text().splitlines(keepends=True)
        half = len(lines) // 2
        for number, chunk in enumerate((lines[:half], lines[half:]), start=1):
            part = source.with_name(f"{name}_part{number}.csv")
            part.write_text(header + "".join(chunk))
        source.unlink()
        out.print(f"{ds.owner}'s {name} ({ds.mode} mode) sent as two files: {name}_part1.csv, {name}_part2.csv")


def _demo_home_prepare(runtime: Any, loaded: Any, generated_at: Path) -> None:
    """The home parties' first half, run locally: keys, tokenised uploads and setup messages, as `dcr psi prepare` makes them."""
    from ..lib import home_psi

    c = loaded.name
    for party in loaded.collaboration.matching.home_parties:
        key_path = generated_at / f"{party}.key"
        keys = home_psi.load_keys(key_path) if key_path.exists() else home_psi.generate_keys(key_path)
        owned = {name: ds for name, ds in loaded.collaboration.datasets.items() if ds.owner == party}
        outbox = generated_at / party / "outbox"
        prepared, setup = home_psi.prepare(loaded, party, keys, {n: generated_at / party / n / f"{n}.csv" for n in owned}, outbox)
        for item in prepared:
            target = runtime.settings.landing / c / party / item.dataset / item.output.name
            target.parent.mkdir(parents=True, exist_ok=True)
            item.output.replace(target)
        psi_folder = runtime.settings.landing / c / party / "_psi"
        psi_folder.mkdir(parents=True, exist_ok=True)
        setup.replace(psi_folder / setup.name)
        out.print(f"{party} (at home, {generated_at / party}): tokenised {', '.join(owned)} and wrote its setup message; no identifier or key left its folder")
    for party in loaded.parties():
        if loaded.at_home(party):
            continue
        for name, ds in loaded.collaboration.datasets.items():
            source = generated_at / party / name / f"{name}.csv"
            if ds.owner == party and source.exists():
                target = runtime.settings.landing / c / party / name / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def _demo_home_respond(runtime: Any, loaded: Any, generated_at: Path) -> None:
    """The home parties' second half, run locally: answer the operator's requests (`dcr psi respond`)."""
    from ..lib import home_psi

    c = loaded.name
    for party in loaded.collaboration.matching.home_parties:
        keys = home_psi.load_keys(generated_at / f"{party}.key")
        for request in sorted((runtime.settings.exports / c / party / "psi").glob(f"*request*{home_psi.SUFFIX}")):
            answer = home_psi.respond(keys, request, c, party, runtime.settings.landing / c / party / "_psi")
            out.print(f"{party} (at home) answered {request.name} -> {answer.name}")


EXAMPLE_AD_HOC = ("ad_network", "select c.loyalty_tier, count(distinct c.customer_email) as buyers, round(avg(c.lifetime_value), 2) as avg_value "
                  "from impressions as i inner join customers as c on c.customer_email = i.user_email group by 1")


def _shows_ad_hoc(loaded: Any) -> bool:
    """The collaboration's rules allow the README's ad-hoc example (demo_home's do not: approved queries only)."""
    from ..lib import ad_hoc

    runner, sql_text = EXAMPLE_AD_HOC
    if not {"impressions", "customers"} <= set(loaded.collaboration.datasets) or runner not in loaded.collaboration.members:
        return False
    try:
        ad_hoc.check(loaded, runner, sql_text)
    except ad_hoc.QueryRefused:
        return False
    return True


def _members_sign_in(runtime: Any, loaded: Any) -> dict[str, Path] | None:
    """A login per member (credentials files under DCR_HOME/members), and each party's approval made through its own
    login, as members do (`dcr policy approve COLLAB --credentials FILE`): once a member has a login, only that counts.
    None when logins cannot be made here (then everything runs as the operator's, as before logins existed)."""
    from ..defs.member_requests import tick
    from ..lib.policy import load_collaboration
    from ..lib.policy.approve import approval_payload
    from ..lib.policy.loader import approvers
    from ..store import member_requests
    from ..store.members import MemberError

    try:
        files = _member_logins(runtime, loaded)
    except MemberError as exc:  # e.g. another database of the same server made these names (roles are per server)
        out.print(f"note: no member logins ({exc}); the demo acts as the operator, for every member", markup=False, soft_wrap=True)
        return None
    payload = approval_payload(load_collaboration(loaded.folder, approvals=False))
    asked, approved = {}, []
    try:
        for party in approvers(loaded.collaboration):
            creds = json.loads(files[party].read_text(encoding="utf-8"))
            with member_requests.connect(creds["url"]) as conn:
                asked[party] = (creds, member_requests.submit(conn, loaded.name, "approve", payload))
        with member_requests.connect(runtime.warehouse.url()) as conn:
            tick(_instance(), conn, loaded, 0, runtime.settings.landing)
        for party, (creds, request_id) in asked.items():
            with member_requests.connect(creds["url"]) as conn:
                done = member_requests.wait(conn, request_id, 30)
            if done.state == "answered":
                approved.append(party)
            else:
                out.print(f"note: {party}'s approval through its login was {done.state}: {done.reason}", markup=False, soft_wrap=True)
    except member_requests.RequestError as exc:
        out.print(f"note: the parties' approvals through their logins were not answered: {exc}", markup=False, soft_wrap=True)
    out.print(f"approved through their own logins: {', '.join(sorted(approved)) or 'none'} (each member: `dcr policy approve {loaded.name} "
              f"--credentials FILE`)", markup=False, soft_wrap=True)
    return files


def _example_ad_hoc(runtime: Any, defs: Any, loaded: Any, files: dict[str, Path] | None) -> None:
    """The README's ad-hoc example, asked the way a member asks: through the runner's own login, as a request row this
    process answers like `dcr serve`; so every asset of the demo has been materialized, and the member path shown."""
    from ..defs.member_requests import serve
    from ..runner import materialize
    from ..store import member_requests

    runner, sql_text = EXAMPLE_AD_HOC
    if files is None:
        out.print(f"note: the example ad-hoc query runs as the operator's, for {runner}", markup=False, soft_wrap=True)
        _operator_ad_hoc(defs, loaded, runner, sql_text)
        return
    creds = json.loads(files[runner].read_text(encoding="utf-8"))
    url = runtime.warehouse.url()
    try:
        with member_requests.connect(creds["url"]) as conn:  # the member's login, over TCP
            asked = member_requests.submit(conn, loaded.name, "query_run", {"sql": sql_text})
            for done in serve(lambda _job, _loaded: defs, loaded, url, _instance(), lambda *a, **k: materialize(*a, stdout_log=_run_log(), **k),
                              runtime.settings.landing):
                if done == asked:
                    break
            answer = member_requests.wait(conn, asked, 60)
    except member_requests.RequestError as exc:
        out.print(f"note: the example ad-hoc query was not answered: {exc}", markup=False)
        return
    if answer.state != "answered":
        out.print(f"note: the example ad-hoc query was {answer.state}: {answer.reason}", markup=False)
        return
    result = answer.answer or {}
    charged = "answered from the store" if result.get("answered_from_store") else f"charged epsilon {float(result.get('epsilon_charged') or 0):g}"
    how = f"differentially private, {charged}" if result.get("mode") == "dp" else "exact, thresholded"
    out.print(f"ad-hoc query of {runner} through its own login {creds['login']} (buyers and their average lifetime value per loyalty tier, {how}): "
              f"{plural(len(result.get('rows') or []), 'row')}; each member asks its own with "
              f"`dcr query run {loaded.name} --credentials {files[runner]} \"SQL\"` while `dcr serve {loaded.name}` (or the "
              f"{loaded.name}__member_requests sensor) answers", markup=False, soft_wrap=True)


def _member_logins(runtime: Any, loaded: Any) -> dict[str, Path]:
    """A login and a credentials file per member of the demo (made once; each run writes new passwords, so the files
    follow the server's current address)."""
    from dataclasses import replace

    from ..lib.database import connect, listening
    from ..store import members
    from .member import _member_url, _write_credentials

    folder = runtime.settings.home / "members" / loaded.name
    files = {}
    with connect(runtime.warehouse.url()) as conn:
        made = {m.member for m in members.listing(conn, loaded.name)}
        for name in loaded.collaboration.members:
            path = folder / f"{name}.json"
            files[name] = path
            login, password = members.rotate(conn, loaded.name, name) if name in made else members.add(conn, loaded, name)
            # Over TCP when the server listens for members (`dcr db listen`, as `make demo` does); else this machine's socket.
            url = (_member_url(runtime, login, password, None, None) if listening(runtime.settings.home) or not runtime.embedded
                   else replace(runtime.warehouse, user=login, password="").url())
            _write_credentials(path, loaded.name, name, login, url)
    how = "" if listening(runtime.settings.home) or not runtime.embedded else " (this machine's socket only: `dcr db listen --port auto` for TCP)"
    out.print(f"member logins: {', '.join(sorted(files))}; credentials in {folder}{how}", markup=False, soft_wrap=True)
    return files


def _operator_ad_hoc(defs: Any, loaded: Any, runner: str, sql_text: str) -> None:
    from ..lib import naming
    from ..runner import ad_hoc_run_config, materialize

    outcome = materialize(defs, [naming.ad_hoc_key(loaded.name)], instance=_instance(), run_config=ad_hoc_run_config(loaded.name, runner, sql_text),
                          stdout_log=_run_log())
    meta = outcome.metadata.get("/".join(naming.ad_hoc_key(loaded.name)), {})
    if outcome.success:
        out.print(f"ad-hoc query of {runner}: {plural(int(meta.get('rows', 0)), 'row')}", markup=False)
    else:
        out.print(f"note: the example ad-hoc query was not answered: {outcome.failure}", markup=False)
