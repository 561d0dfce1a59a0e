"""Secrets are out of reach of models: dbt builds as a login that is not a superuser and owns only its collaboration's
models; keys are usable by it only during a staging build, never readable, and never in the environment dbt runs in.

Every test here tries what a model (SQL run as the builder login) could try, or searches what dbt could see.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from dcr_pipelines.defs import dbt_runner
from dcr_pipelines.defs.dbt_project import project_dir
from dcr_pipelines.lib import naming
from dcr_pipelines.lib.keys import hmac_pads
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.runtime import secret_env_name
from dcr_pipelines.store import access, builder

from .conftest import CANARY, COLLAB

pytestmark = pytest.mark.slow


def _who() -> builder.Login:
    return builder.login(COLLAB, bytes.fromhex(os.environ[secret_env_name("PAIRING", COLLAB)]))


@contextmanager
def _as_builder(url: str) -> Iterator[psycopg.Connection]:
    """A session of the builder login, as dbt opens one (its own user and password)."""
    who = _who()
    with psycopg.connect(url, user=who.user, password=who.password, autocommit=True) as conn:
        assert conn.execute("select session_user").fetchone() == (who.user,)
        yield conn


def _refused(conn: psycopg.Connection, statement: str) -> str:
    with pytest.raises(psycopg.errors.Error) as caught:
        conn.execute(statement).fetchall()
    return str(caught.value)


def _keys() -> dict[str, bytes]:
    return {p: bytes.fromhex(CANARY[p]) for p in ("retailer", "ad_network")}


def test_the_builder_is_no_superuser_and_owns_exactly_its_collaborations_models(e2e: dict[str, Any]) -> None:
    loaded = load_collaboration(e2e["root"] / COLLAB)
    who = _who()
    with psycopg.connect(e2e["url"]) as conn:
        flags = conn.execute("select rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin from pg_roles "
                             "where rolname = %s", (who.user,)).fetchone()
        assert flags == (False, False, False, False, False, True)
        owned = conn.execute("select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                             "where pg_get_userbyid(c.relowner) = %s and c.relkind in ('r', 'v', 'm', 'p')", (who.user,)).fetchall()
        assert owned, "dbt's models are the builder's"
        assert {s for s, _ in owned} <= set(builder.model_schemas(loaded)), "the builder owns nothing outside its models' schemas"
        models = builder.model_relations(loaded)
        assert set(owned) <= models, "the builder owns its models and nothing else"
        present = {r for r in conn.execute("select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                                           "where c.relkind in ('r', 'v')").fetchall() if r in models}
        assert present == set(owned) and len(present) >= 8, "every model is the builder's (none left to the operator's login)"
        # No schema of any other collaboration, of the operator or of the keys is open to it, beyond calling the token function.
        allowed = {*builder.model_schemas(loaded), naming.matching_schema(COLLAB), builder.KEYS_SCHEMA, "dcr_meta", "public", "pg_catalog",
                   "information_schema"}
        reachable = {s for (s,) in conn.execute("select nspname from pg_namespace where has_schema_privilege(%s, oid, 'USAGE')", (who.user,))}
        assert reachable <= allowed, reachable - allowed
        assert naming.results_schema(COLLAB) not in reachable
        assert access.builder_role(COLLAB) in access.roles(loaded)


def test_sql_run_as_the_builder_cannot_read_a_key_the_servers_files_or_another_schema(e2e: dict[str, Any]) -> None:
    with _as_builder(e2e["url"]) as conn:
        attempts = [
            "select * from dcr_keys.hmac_pads",
            "select dcr_keys.keyed_token('retailer', 'someone@example.com')",  # outside a staging build: no key is open
            "select pg_read_file('/proc/self/environ')",
            "select pg_ls_dir('.')",
            "copy (select 1) to program 'true'",
            f"select * from {naming.results_schema(COLLAB)}.budget_ledger",
            "create or replace function dcr_keys.keyed_token(party text, value text) returns text language sql as $$ select value $$",
            "alter role current_user superuser",
            "set role postgres",
        ]
        for statement in attempts:
            _refused(conn, statement)
        # Of the operator's tables, only its own collaboration's rows of the two its models read.
        for table in builder.META_READS:
            assert conn.execute(f"select count(*) from dcr_meta.{table} where collaboration <> %s", (COLLAB,)).fetchone() == (0,)
        assert conn.execute("select count(*) from dcr_meta.dataset_versions").fetchone()[0] > 0
        _refused(conn, "select * from dcr_meta.uploads")
        _refused(conn, "insert into dcr_meta.query_requests (collaboration, query_name) values ('other', 'q')")
        for party in ("retailer", "ad_network"):
            for part in ("inner", "outer"):
                assert conn.execute("select current_setting(%s, true)", (f"dcr.hmac_{party}_{part}",)).fetchone() in {(None,), ("",)}
        # Writing into an upload (raw) table is not the builder's either: it only reads them and creates its own models.
        raw = conn.execute("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s "
                           "and c.relkind = 'r' and pg_get_userbyid(c.relowner) <> session_user limit 1",
                           (naming.raw_schema(COLLAB, "retailer"),)).fetchone()
        assert raw is not None
        _refused(conn, f'delete from "{naming.raw_schema(COLLAB, "retailer")}"."{raw[0]}"')


def test_during_a_build_the_key_is_usable_never_readable_and_dbt_sees_no_secret(e2e: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from dbt.cli.main import dbtRunner

    seen: list[tuple[str, dict[str, str]]] = []
    real = dbtRunner.invoke

    def spy(self: Any, args: list[str], **kwargs: Any) -> Any:  # records the environment dbt runs in, then runs the real dbt
        seen.append((args[0], dict(os.environ)))
        return real(self, args, **kwargs)

    monkeypatch.setattr(dbtRunner, "invoke", spy)
    who = _who()
    model = naming.normalised_model(COLLAB, "retailer", "customers")
    with psycopg.connect(e2e["url"], autocommit=True) as conn, builder.open_pads(conn, who, _keys()):
        with _as_builder(e2e["url"]) as as_builder:
            _refused(as_builder, "select inner_pad from dcr_keys.hmac_pads")
            token = as_builder.execute("select dcr_keys.keyed_token('retailer', 'ana@example.org')").fetchone()
            assert token == (hmac.new(_keys()["retailer"], b"ana@example.org", hashlib.sha256).hexdigest(),), "a real HMAC under the party's key"
            assert as_builder.execute("select dcr_keys.keyed_token('retailer', null)").fetchone() == (None,)
        project = project_dir(e2e["settings"].dbt_project, e2e["settings"].policies)
        built = dbt_runner.build(project, ["--select", model], label="builder-test", login=who)
        assert built.success, built.errors
    assert "build" in [command for command, _ in seen], "dbt ran"
    needles = [k for key in CANARY.values() for k in (key, key.upper(), hmac_pads(bytes.fromhex(key)).inner.hex(), hmac_pads(bytes.fromhex(key)).outer.hex())]
    for command, env in seen:  # a parse (when this process had not parsed yet) connects to nothing; a build logs in as the builder
        assert command != "build" or env["DCR_PG_USER"] == who.user
        assert not [k for k in env if k.startswith("DCR_SECRET__")]
        assert "DCR_DATABASE_URL" not in env and "dcr.hmac" not in env.get("PGOPTIONS", "")
        assert command != "build" or "client_connection_check_interval" in env["PGOPTIONS"]
        for name, value in env.items():
            for needle in needles:
                assert needle not in value, f"key material in {name} of dbt's environment"
    assert os.environ[secret_env_name("HMAC", COLLAB, "retailer")] == CANARY["retailer"], "restored for the rest of the run"
    with psycopg.connect(e2e["url"]) as conn:
        assert conn.execute("select count(*) from dcr_keys.hmac_pads").fetchone() == (0,), "the pads are gone when the build ends"
        owner = conn.execute("select pg_get_userbyid(relowner) from pg_class where oid = to_regclass(%s)",
                             (f"{naming.raw_schema(COLLAB, 'retailer')}.customers__normalised",)).fetchone()
    assert owner == (who.user,), "the model dbt rebuilt is the builder's"


def test_nothing_the_builder_could_make_runs_as_a_reader_it_is_refused_before_any_read(e2e: dict[str, Any]) -> None:
    """The dbt login cannot put a trigger on (or write) the operator's tables; a function, trigger or extra relation it
    makes is found before the operator reads its models (a view calling it would run as the reader): releases, ad-hoc
    queries and matching refuse with one line naming it, and go on once it is gone."""
    from dcr_pipelines.runner import ad_hoc_run_config, materialize

    analysis = naming.analysis_schema(COLLAB)
    loaded = load_collaboration(e2e["root"] / COLLAB)
    with _as_builder(e2e["url"]) as conn:
        operator_table = conn.execute("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s "
                                      "and c.relkind = 'r' and pg_get_userbyid(c.relowner) <> session_user limit 1", (analysis,)).fetchone()
        assert operator_table is not None, "the operator keeps a table of its own in the analysis schema"
        conn.execute(f'create function "{analysis}".t() returns trigger language plpgsql as $$ begin return new; end $$')
        try:
            _refused(conn, f'create trigger t before insert on "{analysis}"."{operator_table[0]}" for each row execute function "{analysis}".t()')
            _refused(conn, f'delete from "{analysis}"."{operator_table[0]}"')
            with psycopg.connect(e2e["url"]) as operator, pytest.raises(builder.BuilderTampered) as caught:
                builder.verify(operator, loaded)
            assert f"function {analysis}.t" in str(caught.value) and "nothing was read" in str(caught.value)
            import dagster as dg

            asked = materialize(e2e["defs"], [naming.ad_hoc_key(COLLAB)], instance=dg.DagsterInstance.get(),
                                run_config=ad_hoc_run_config(COLLAB, "ad_network", "select i.campaign_id, count(*) as n from impressions as i group by 1"))
            assert asked.refused and "(integrity)" in (asked.failure or "") and f"function {analysis}.t" in (asked.failure or "")
            conn.execute(f'create table "{analysis}".extra (x int)')
            with psycopg.connect(e2e["url"]) as operator, pytest.raises(builder.BuilderTampered) as caught:
                builder.verify(operator, loaded)
            assert f"relation {analysis}.extra" in str(caught.value)
        finally:
            conn.execute(f'drop table if exists "{analysis}".extra')
            conn.execute(f'drop function if exists "{analysis}".t()')
    with psycopg.connect(e2e["url"]) as operator:
        builder.verify(operator, loaded)  # gone: nothing to refuse


def test_no_collaboration_name_makes_its_dbt_login_another_collaborations_role() -> None:
    """`dcr_<c>_dbt_login` ends in a suffix no other role kind has: collaboration x_analysis's login is not x's
    analysis_builder group (a collision the first naming had)."""
    import random

    rng = random.Random(4)
    names = ["x", "x_analysis", "x_matching", "a_b", "a", "b", "dbt", "x_dbt", *("".join(rng.choice("ab_") for _ in range(rng.randint(1, 6))).strip("_") or "a" for _ in range(200))]
    kinds = ["admin", "matching", "analysis_builder", "query_runner", "dbt_login"]
    owners: dict[str, str] = {}
    for c in set(names):
        roles = [access.role_name(c, k) for k in kinds if k != "dbt_login"]
        roles += [access.role_name(c, p, k) for p in ("r", "ad", "a_b") for k in ("raw_owner", "staging_loader", "result_reader")]
        for role in roles:
            owners.setdefault(role, c)
    for c in set(names):
        assert owners.get(access.builder_role(c), c) == c, (c, access.builder_role(c))
