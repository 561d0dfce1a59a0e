"""Members act under their own logins, over TCP: requests are rows, answers are rows only the asker reads.

A deployment of its own (its own embedded PostgreSQL, listening on a free port for member logins), the operator's
`dcr` for operator tasks and `dcr serve` answering, and each member's `dcr` run with nothing but its credentials
file (no DCR_* variable, no policy folder, no socket). Then a generated matrix: every table of the warehouse, every
role, every other member's rows, tried as each login.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.lib import demo_data, naming

from .conftest import land, make_collaboration

pytestmark = pytest.mark.slow
C = "mem"
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
DP_SQL = ("select c.loyalty_tier, count(distinct c.customer_email) as buyers from impressions as i "
          "inner join customers as c on c.customer_email = i.user_email group by c.loyalty_tier")
EXACT_SQL = "select i.campaign_id, count(*) as n from impressions as i group by 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("members_home")
    root = tmp_path_factory.mktemp("members_policies")
    make_collaboration(root, C, groups=24, budget=20.0, receivers="[ad_network]")
    landing = home / "landing"
    land(demo_data.generate(home / "generated", rows=1_200, overlap=0.5, seed=29), landing, C)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_", "DBT_", "PG"))}
    env.update({"DCR_HOME": str(home), "DCR_LANDING": str(landing), "DCR_POLICIES": str(root), "DCR_SETTLE_SECONDS": "0"})
    port = _free_port()

    def operator(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=timeout, env=env)

    for args in (["db", "listen", "--port", str(port)], ["run", C]):
        done = operator(*args)
        assert done.returncode == 0, done.stderr
    creds = {}
    for member in ("ad_network", "retailer"):
        path = home / f"{member}.json"
        done = operator("member", "add", C, member, "--out", str(path))
        assert done.returncode == 0, done.stderr
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        creds[member] = json.loads(path.read_text())
    def start_serve() -> subprocess.Popen[str]:
        with (home / "serve.log").open("a") as log:  # what each answerer said, for a failing test to show
            return subprocess.Popen([*DCR, "serve", C], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)

    serving = [start_serve()]
    operator_url = f"postgresql://postgres@/dcr?host={home / 'pg'}&port={port}"
    reviewed = home / "reviewed" / C  # the members' reviewed copy of the policy (their git clone)
    shutil.copytree(root / C, reviewed)
    deployment = {"home": home, "env": env, "port": port, "creds": creds, "operator": operator, "operator_url": operator_url,
                  "files": {m: home / f"{m}.json" for m in creds}, "policy": root / C, "reviewed": reviewed,
                  "serving": serving, "start_serve": start_serve}
    try:
        for member in creds:  # once a member has a login, only its login's approval counts
            done = member_dcr(deployment, "policy", "approve", C, "--credentials", str(deployment["files"][member]), "--folder", str(reviewed))
            assert done.returncode == 0, done.stderr
            assert "recorded in" in done.stdout and "audit chain" in done.stdout, done.stdout
        yield deployment
    finally:
        serving[0].send_signal(signal.SIGINT)
        try:
            serving[0].wait(timeout=30)
        except subprocess.TimeoutExpired:
            serving[0].kill()
        subprocess.run([*DCR, "db", "stop"], env=env, capture_output=True, timeout=60, check=False)


def member_dcr(deployment: dict[str, Any], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The member's own machine: nothing but its credentials file (no DCR_* variable, no policies, no socket)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(deployment["home"] / "member_home"), "LANG": "C.UTF-8"}
    return subprocess.run([*DCR, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=deployment["home"])


def test_a_member_runs_its_query_with_its_login_and_reads_the_same_answer_from_any_postgresql_client(deployment: dict[str, Any]) -> None:
    creds = str(deployment["files"]["ad_network"])
    done = member_dcr(deployment, "query", "run", C, "--credentials", creds, "--format", "json", EXACT_SQL)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["mode"] == "exact" and answer["columns"] == ["campaign_id", "n"] and answer["rows"], answer
    # The same rows through a plain PostgreSQL connection as the member's login (a BI tool): its own answers table.
    with psycopg.connect(deployment["creds"]["ad_network"]["url"]) as conn:
        table = sql.Identifier(naming.results_schema(C), "ad_hoc__ad_network")
        stored = conn.execute(sql.SQL("select rows from {} where run_id = %s").format(table), (answer["run_id"],)).fetchone()
    assert stored is not None and stored[0] == answer["rows"]
    # The run is the member's in Dagster's storage: tagged with its login, through the operator's own `dcr audit`.
    audit = deployment["operator"]("audit", C, "--format", "jsonl")
    assert audit.returncode == 0, audit.stderr
    assert deployment["creds"]["ad_network"]["login"] in audit.stdout and answer["run_id"] in audit.stdout
    # A DP query is charged to the member who asked, and its budget is its own.
    dp = member_dcr(deployment, "query", "run", C, "--credentials", creds, "--format", "json", DP_SQL)
    assert dp.returncode == 0, dp.stderr
    charged = json.loads(dp.stdout)
    assert charged["mode"] == "dp" and charged["epsilon_charged"] > 0
    budget = member_dcr(deployment, "budget", C, "--credentials", creds, "--format", "json")
    assert budget.returncode == 0, budget.stderr
    report = json.loads(budget.stdout)
    assert [c["consumer"] for c in report["rows"]] == ["ad_network"]
    assert abs(report["rows"][0]["remaining"] - charged["epsilon_remaining"]) < 1e-9


def test_a_refusal_and_a_wrong_member_are_one_error_line(deployment: dict[str, Any]) -> None:
    retailer = str(deployment["files"]["retailer"])
    refused = member_dcr(deployment, "query", "run", C, "--credentials", retailer, EXACT_SQL)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused.stderr
    assert "run_queries" in refused.stderr or "may not run" in refused.stderr, refused.stderr
    # The retailer neither receives campaign_reach nor spends for it: asking for a release is refused, nothing charged.
    release = member_dcr(deployment, "release", C, "campaign_reach", "--credentials", retailer)
    assert release.returncode == 1 and "campaign_reach is ad_network's to ask for" in release.stderr, release.stderr
    asked = member_dcr(deployment, "release", C, "campaign_reach", "--credentials", str(deployment["files"]["ad_network"]), "--format", "json")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["rows"]
    with_as = member_dcr(deployment, "query", "run", C, "--credentials", retailer, "--member", "ad_network", EXACT_SQL)
    assert with_as.returncode == 2 and "drop --member" in with_as.stderr
    other = member_dcr(deployment, "budget", "demo", "--credentials", retailer)
    assert other.returncode == 2 and "not of demo" in other.stderr


def _spent(deployment: dict[str, Any]) -> float:
    done = deployment["operator"]("budget", C, "--format", "json")
    assert done.returncode == 0, done.stderr
    return float(json.loads(done.stdout)["rows"][0]["spent"])


def _member_approves(deployment: dict[str, Any], member: str) -> subprocess.CompletedProcess[str]:
    return member_dcr(deployment, "policy", "approve", C, "--credentials", str(deployment["files"][member]), "--folder", str(deployment["reviewed"]))


def _one_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_only_an_approval_made_through_the_members_own_login_counts(deployment: dict[str, Any]) -> None:
    """Every other way to an approval fails: the operator's --member, the files edited by hand, a copy the member did not
    review, one member's approval standing for another's, an audit entry written by the operator; a loosening of what
    a member approved stops ad-hoc queries too, a tightening does not."""
    from dcr_pipelines.lib.policy.approve import approve_all
    from dcr_pipelines.store import audit_chain

    operator, policy, reviewed = deployment["operator"], deployment["policy"], deployment["reviewed"]
    _one_error(operator("policy", "approve", C, "--member", "retailer"), 2, "approves only through it")
    sql_file, spec_file = policy / "queries" / "campaign_reach.sql", policy / "collaboration.yaml"
    original_sql, original_spec = sql_file.read_text(), spec_file.read_text()
    try:
        sql_file.write_text(original_sql + "\n-- changed after the members approved\n")
        approve_all(policy)  # the files now say every party approved the new hash
        spent = _spent(deployment)
        _one_error(operator("release", C, "campaign_reach"), 1, "approval", "login has not approved query 'campaign_reach' as it is now")
        assert _spent(deployment) == spent
        # A member approving a copy that is not the operator's (the one it reviewed, before the change): nothing recorded.
        _one_error(_member_approves(deployment, "ad_network"), 1, "your copy of mem's policy is not the operator's", "query 'campaign_reach'")
        shutil.copy(sql_file, reviewed / "queries" / "campaign_reach.sql")  # the member pulls and reviews the change
        assert _member_approves(deployment, "ad_network").returncode == 0
        # One member's approval is not another's, nor is an entry the operator writes into the chain for it.
        _one_error(operator("release", C, "campaign_reach"), 1, "retailer's login has not approved query 'campaign_reach'")
        with psycopg.connect(deployment["operator_url"], autocommit=True) as conn:
            schema = naming.results_schema(C)
            theirs = audit_chain.chain(conn, schema)[-1]
            assert theirs.kind == "approval" and theirs.ref == "ad_network"
            forged = {**theirs.entry, "member": "retailer", "login": deployment["creds"]["retailer"]["login"]}
            audit_chain.append(conn, schema, C, "approval", "retailer", forged)
        _one_error(operator("release", C, "campaign_reach"), 1, "retailer has a member login, so only an approval made through it counts")
        assert _member_approves(deployment, "retailer").returncode == 0
        released = operator("release", C, "campaign_reach", "--format", "json")
        assert released.returncode == 0, released.stderr
        assert _spent(deployment) > spent
        # What protects a member's data: loosened (a bigger budget) stops ad-hoc SQL until it approves; tightened does not.
        for epsilon, refused in (("40.0", True), ("19.0", False)):
            spec_file.write_text(original_spec.replace("    epsilon: 20.0", f"    epsilon: {epsilon}"))
            approve_all(policy)
            asked = operator("query", "run", C, "--member", "ad_network", DP_SQL)
            if refused:
                _one_error(asked, 1, "approved through its login", "the epsilon of ad_network's budget goes from 20.0 to 40.0")
            else:
                assert asked.returncode == 0, asked.stderr
    finally:
        sql_file.write_text(original_sql)
        spec_file.write_text(original_spec)
        approve_all(policy)
        shutil.copy(sql_file, reviewed / "queries" / "campaign_reach.sql")
        for member in ("ad_network", "retailer"):
            assert _member_approves(deployment, member).returncode == 0
    assert operator("audit", C, "--verify").returncode == 0


def test_a_member_reads_its_report_and_plans_a_release_through_its_login(deployment: dict[str, Any]) -> None:
    ad_network, retailer = str(deployment["files"]["ad_network"]), str(deployment["files"]["retailer"])
    spent = _spent(deployment)
    planned = member_dcr(deployment, "release", C, "campaign_reach", "--dry-run", "--credentials", ad_network)
    assert planned.returncode == 0, planned.stderr
    assert "release would cost epsilon" in planned.stdout and "of ad_network's budget" in planned.stdout
    assert _spent(deployment) == spent
    _one_error(member_dcr(deployment, "release", C, "campaign_reach", "--dry-run", "--credentials", retailer), 1, "ad_network's to ask for")
    home = deployment["home"]
    mine = member_dcr(deployment, "report", C, "--credentials", ad_network, "--out", str(home / "report_login"))
    assert mine.returncode == 0, mine.stderr
    operators = deployment["operator"]("report", C, "--member", "ad_network", "--out", str(home / "report_operator"))
    assert operators.returncode == 0, operators.stderr
    files = sorted(str(p.relative_to(home / "report_login")) for p in (home / "report_login").rglob("*") if p.is_file())
    assert "index.html" in files and files == sorted(str(p.relative_to(home / "report_operator"))
                                                    for p in (home / "report_operator").rglob("*") if p.is_file())
    page = (home / "report_login" / "index.html").read_text()
    assert "campaign_reach" in page and "ad_network" in page
    _one_error(member_dcr(deployment, "report", C, "--credentials", ad_network, "--member", "retailer", "--out", str(home / "r3")), 2, "drop --member")


def test_an_answerer_killed_at_any_instant_leaves_no_request_waiting_and_charges_at_most_once(deployment: dict[str, Any]) -> None:
    """`dcr serve` killed (SIGKILL) at random instants of a DP ad-hoc request, then started again: every request ends
    answered or failed within a bound (the restarted answerer fails the runs the dead one left), asking again answers
    it, a second answerer is refused, and the runner is charged at most once per query."""
    import random

    from dcr_pipelines.store import member_requests

    rng = random.Random(31)
    url = deployment["creds"]["ad_network"]["url"]
    serving = deployment["serving"]
    second = subprocess.run([*DCR, "serve", C, "--once"], env=deployment["env"], capture_output=True, text=True, timeout=120)
    _one_error(second, 1, "answers mem's member requests already")
    for trial in range(4):
        text = DP_SQL.replace("as buyers", f"as buyers_{trial}")
        spent = _spent(deployment)
        with psycopg.connect(url, autocommit=True) as conn:
            asked = member_requests.submit(conn, C, "query_run", {"sql": text})
            time.sleep(rng.uniform(0.0, 5.0))
            serving[0].kill()
            serving[0].wait(timeout=30)
            serving[0] = deployment["start_serve"]()
            try:
                done = member_requests.wait(conn, asked, 180)
            except member_requests.RequestError as exc:
                raise AssertionError(f"{exc}; the answerers said: {(deployment['home'] / 'serve.log').read_text()[-3000:]}") from None
        assert done.state in ("answered", "failed"), done
        if done.state == "failed":
            assert "ask again" in (done.reason or ""), done.reason
            again = member_dcr(deployment, "query", "run", C, "--credentials", str(deployment["files"]["ad_network"]), "--format", "json", text)
            assert again.returncode == 0, again.stderr
        assert _spent(deployment) - spent <= 1.0 + 1e-9  # epsilon_per_query 1.0: one charge at most
    with psycopg.connect(deployment["operator_url"]) as conn:
        waiting = conn.execute("select count(*) from dcr_meta.member_requests where collaboration = %s and state in ('pending', 'launched')",
                               (C,)).fetchone()
    assert waiting == (0,)


def _tables(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [(s, t) for s, t in conn.execute(
            "select table_schema, table_name from information_schema.tables where table_schema like %s or table_schema in ('dcr_meta', 'dcr_keys') "
            "order by 1, 2", (f"{C}\\_%",)).fetchall()]


def _readable(url: str, schema: str, table: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("select * from {} limit 1").format(sql.Identifier(schema, table)))
            return True
        except psycopg.errors.InsufficientPrivilege:
            return False


def test_every_table_of_the_warehouse_is_closed_to_each_member_login_but_its_own_answers(deployment: dict[str, Any]) -> None:
    """The generated matrix: every table of the collaboration's schemas, of dcr_meta and of dcr_keys, read as each login."""
    results = naming.results_schema(C)
    tables = _tables(deployment["operator_url"])
    assert len(tables) > 20, tables
    for member, creds in deployment["creds"].items():
        # What the member may read: the released results of the query it receives (campaign_reach), the overlap release,
        # its own ad-hoc answers, its own request rows. Nothing else, in any schema.
        allowed = {(results, "overlap"), (results, f"ad_hoc__{member}"), ("dcr_meta", "member_requests")}
        allowed |= {(results, "campaign_reach")} if member == "ad_network" else set()  # the only receiver of campaign_reach
        readable = {(s, t) for s, t in tables if _readable(creds["url"], s, t)}
        assert readable <= allowed, f"{member} reads {sorted(readable - allowed)}"
        assert ("dcr_meta", "member_requests") in readable


def test_a_login_cannot_become_another_member_nor_act_or_read_for_one(deployment: dict[str, Any]) -> None:
    retailer, ad_network = deployment["creds"]["retailer"], deployment["creds"]["ad_network"]
    roles = [f"dcr_{C}_ad_network_result_reader", ad_network["login"], f"dcr_{C}_admin", f"dcr_{C}_query_runner", f"dcr_{C}_dbt_login",
             f"dcr_{C}_analysis_builder", "dcr_keyholder", "dcr_request_desk", "postgres"]
    with psycopg.connect(retailer["url"], autocommit=True) as conn:
        for role in roles:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("set role {}").format(sql.Identifier(role)))
        # No request can name another member: the function takes none; the member is the session's login.
        request = conn.execute("select dcr_meta.submit_request(%s, 'budget', '{\"member\": \"ad_network\"}'::jsonb)", (C,)).fetchone()[0]  # type: ignore[index]
        row = conn.execute("select member from dcr_meta.member_requests where id = %s", (request,)).fetchone()
        assert row == ("retailer",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select dcr_meta.submit_request('demo', 'budget', '{}'::jsonb)")
        for statement in ("insert into dcr_meta.member_requests (collaboration, member, kind, payload) values ('mem', 'ad_network', 'budget', '{}')",
                          "update dcr_meta.member_requests set member = 'ad_network'", "delete from dcr_meta.member_requests",
                          "select dcr_keys.keyed_token('retailer', 'a@example.com')", "select * from dcr_meta.member_logins"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        # The other member's requests and answers are not there for this login.
        theirs = conn.execute("select count(*) from dcr_meta.member_requests where member = 'ad_network'").fetchone()
        assert theirs == (0,)
    with psycopg.connect(ad_network["url"], autocommit=True) as conn:
        assert conn.execute("select count(*) from dcr_meta.member_requests where member = 'ad_network'").fetchone()[0] > 0  # type: ignore[index]


def test_over_tcp_only_member_logins_get_in_and_only_to_the_warehouse(deployment: dict[str, Any]) -> None:
    port = deployment["port"]
    login = deployment["creds"]["retailer"]["url"]
    for url in (f"postgresql://postgres@127.0.0.1:{port}/dcr", f"postgresql://dcr_{C}_dbt_login@127.0.0.1:{port}/dcr",
                login.replace("/dcr", "/dagster"), login.rsplit(":", 1)[0].rsplit(":", 1)[0] + f":wrong@127.0.0.1:{port}/dcr"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()


def test_a_member_uploads_its_own_dataset_through_its_login_and_only_its_own(deployment: dict[str, Any]) -> None:
    """No shared folder: the file is streamed over the login, queued, validated and loaded by the operator's Dagster."""
    retailer = str(deployment["files"]["retailer"])
    good = deployment["home"] / "purchases_march.csv"
    good.write_text("customer_email,purchase_value,purchase_date,store_region\n"
                    + "".join(f"m{i}@example.com,{10 + i},2026-03-{1 + i % 27:02d},north\n" for i in range(300)))
    done = member_dcr(deployment, "upload", C, "purchases", str(good), "--credentials", retailer)
    assert done.returncode == 0, done.stderr
    assert f"{C}/retailer/purchases: upload #" in done.stdout and "accepted as version" in done.stdout and "300 rows" in done.stdout, done.stdout
    listed = deployment["operator"]("uploads", "list", C, "--dataset", "purchases")
    assert "purchases_march.csv" in listed.stdout and "accepted" in listed.stdout, listed.stdout
    bad = deployment["home"] / "purchases_bad.csv"
    bad.write_text("customer_email,purchase_value,purchase_date\na@example.com,1,2026-02-01\n")
    refused = member_dcr(deployment, "upload", C, "purchases", str(bad), "--credentials", retailer)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "quarantined" in refused.stderr and "store_region" in refused.stderr, refused.stderr
    theirs = member_dcr(deployment, "upload", C, "impressions", str(good), "--credentials", retailer)
    assert theirs.returncode == 1 and "is ad_network's" in theirs.stderr, theirs.stderr
    with psycopg.connect(deployment["creds"]["retailer"]["url"], autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from dcr_meta.member_upload_chunks")


def _payloads() -> list[tuple[str, dict[str, Any]]]:
    """Requests as a member's raw SQL can make them: a wrong type or shape in every field of every kind."""
    import uuid

    odd: list[Any] = [None, 5, -1, 1.5, True, "", "x" * 5000, "../../etc/passwd", "D" * 300 + ".csv", "a\u0000b"[:1], "1"]
    out: list[tuple[str, dict[str, Any]]] = []
    fields = {"query_run": ["sql"], "query_check": ["sql"], "release": ["query", "params"], "budget": ["anything"],
              "upload": ["dataset", "file_name", "token", "chunks", "size", "sha256"], "approve": ["query:campaign_reach", "protections:retailer"],
              "report": ["anything"]}
    base = {"upload": {"dataset": "purchases", "file_name": "p.csv", "token": str(uuid.uuid4()), "chunks": 1, "size": 1, "sha256": "0" * 64},
            "release": {"query": "campaign_reach", "params": {}}, "query_run": {"sql": EXACT_SQL}, "query_check": {"sql": EXACT_SQL}, "budget": {},
            "approve": {"query:campaign_reach": "0" * 64, "protections:retailer": "0" * 64}, "report": {}}
    for kind, names in fields.items():
        for name in names:
            for value in odd:
                out.append((kind, {**base[kind], name: value}))
    return out


def test_no_request_a_member_can_write_stops_the_answering_loop_or_stays_unanswered(deployment: dict[str, Any]) -> None:
    """Every field of every kind with a wrong value (generated), plus payloads too deep for a JSON reader: each ends
    answered, refused or failed, and the loop answers the next request as before."""
    url = deployment["creds"]["ad_network"]["url"]
    with psycopg.connect(url, autocommit=True) as conn:
        for depth in (900, 3000):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute("select dcr_meta.submit_request(%s, 'budget', %s::jsonb)", (C, '{"x":' + "[" * depth + "]" * depth + "}"))
        for statement in ("select lo_create(0)", "select lo_from_bytea(0, 'x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        asked = []
        for kind, payload in _payloads():
            while True:  # at most 20 waiting per login: wait for room
                try:
                    asked.append(conn.execute("select dcr_meta.submit_request(%s, %s, %s::jsonb)", (C, kind, json.dumps(payload))).fetchone()[0])  # type: ignore[index]
                    break
                except psycopg.errors.ConfigurationLimitExceeded:
                    time.sleep(0.5)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            waiting = conn.execute("select count(*) from dcr_meta.member_requests where id = any(%s) and state in ('pending', 'launched')",
                                   (asked,)).fetchone()[0]  # type: ignore[index]
            if not waiting:
                break
            time.sleep(1)
        states = dict(conn.execute("select state, count(*) from dcr_meta.member_requests where id = any(%s) group by 1", (asked,)).fetchall())
    assert set(states) <= {"answered", "refused", "failed"}, states
    budget = member_dcr(deployment, "budget", C, "--credentials", str(deployment["files"]["ad_network"]), "--format", "json")
    assert budget.returncode == 0, budget.stderr


def test_a_revoked_login_is_out_at_once(deployment: dict[str, Any]) -> None:
    done = deployment["operator"]("member", "add", C, "retailer")
    assert done.returncode == 2 and "has a login already" in done.stderr
    rotated = deployment["operator"]("member", "rotate", C, "retailer", "--out", str(deployment["home"] / "retailer2.json"))
    assert rotated.returncode == 0, rotated.stderr
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(deployment["creds"]["retailer"]["url"], connect_timeout=5).close()
    fresh = json.loads((deployment["home"] / "retailer2.json").read_text())
    psycopg.connect(fresh["url"], connect_timeout=5).close()
    revoked = deployment["operator"]("member", "revoke", C, "retailer")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(fresh["url"], connect_timeout=5).close()
    gone = member_dcr(deployment, "budget", C, "--credentials", str(deployment["home"] / "retailer2.json"))
    assert gone.returncode == 3 and gone.stderr.startswith("error: cannot reach the clean room") and gone.stderr.count("\n") == 1, gone.stderr
    listed = deployment["operator"]("member", "list", C)
    assert "(none: `dcr member add`)" in listed.stdout and deployment["creds"]["ad_network"]["login"] in listed.stdout
    # A revoked login does not make the policy files count again for the member that approved through it.
    from dcr_pipelines.lib.policy.approve import approve_all

    spec_file = deployment["policy"] / "collaboration.yaml"
    original = spec_file.read_text()
    try:
        spec_file.write_text(original.replace("    epsilon: 20.0", "    epsilon: 40.0"))
        approve_all(deployment["policy"])  # the operator may write retailer's approval now (no login): it does not count
        asked = deployment["operator"]("query", "run", C, "--member", "ad_network", DP_SQL)
        _one_error(asked, 1, "loosens what retailer approved through its login")
    finally:
        spec_file.write_text(original)
        approve_all(deployment["policy"])


def test_dropping_the_collaboration_drops_its_member_logins(deployment: dict[str, Any]) -> None:
    dropped = deployment["operator"]("db", "drop", C, "--yes")
    assert dropped.returncode == 0, dropped.stderr
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(deployment["creds"]["ad_network"]["url"], connect_timeout=5).close()
    with psycopg.connect(deployment["operator_url"]) as conn:
        assert conn.execute("select count(*) from pg_roles where rolname like %s", (f"dcr\\_{C}\\_%",)).fetchone() == (0,)
        assert conn.execute("select count(*) from dcr_meta.member_logins where collaboration = %s", (C,)).fetchone() == (0,)
        assert conn.execute("select count(*) from dcr_meta.member_requests where collaboration = %s", (C,)).fetchone() == (0,)
