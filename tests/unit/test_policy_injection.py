"""Policy text is data: generated payloads in every policy field that reaches a dbt model never run as a template.

Two layers, each tested on its own:

1. ``dcr policy check`` refuses Jinja syntax (``{{``, ``{%``, ``{#``) anywhere in a policy file, naming file,
   line and column, and loads nothing of it.
2. Past the check (the payload put straight into the loaded policy), the generated models still hold it only as
   data: each model rendered by a Jinja environment with dbt's names (ref, source, config, the project's macros)
   and nothing else makes no call but those, reads no variable, and yields SQL in which the payload is a quoted
   literal or a comment, byte for byte.
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
import sqlglot
from sqlglot import exp

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.policy import ApprovedQuery, PolicyError, load_collaboration
from dcr_pipelines.lib.policy.models import Dimension, RowFilter
from dcr_pipelines.lib.settings import PROJECT_ROOT

TAGS = ["{{ run_query('create table stolen as select 1') }}", "{% do run_query('drop table x') %}", "{# hidden #}",
        "{{ env_var('DCR_SECRET__HMAC__DEMO__RETAILER') }}", "{%- set x = 1 -%}", "{{- var('x') -}}", "{{", "{%", "{#",
        "{{'}}'}}", "{{ config.get('x') }}", "{% raw %}{{ x }}{% endraw %}"]
OTHER = ["x'); drop table t; --", "'; select pg_sleep(10); --", "*/ select 1; /*", "\\' or 1=1 --", "｛｛ env_var('X') ｝｝",
         "{ {x} }", "%}", "}}", "#}", "\u202e{{", "a\u200b{{b"]


def payloads(seed: int, count: int) -> list[str]:
    """Jinja constructs alone and wrapped in text, quote breaking and comment tricks, unicode look-alikes."""
    rng = random.Random(seed)
    out = list(TAGS + OTHER)
    while len(out) < count:
        out.append(f"{rng.choice(['', 'north', 'a b', 'x'])}{rng.choice(TAGS + OTHER)}{rng.choice(['', ' tail', chr(39), '--'])}")
    return out


FIELDS = {
    # field: (file, text to replace, replacement with {p}) -- every policy value that reaches a generated model
    "row filter value": ("collaboration.yaml", '      - {column: purchase_value, op: ">=", value: 0}',
                         "      - {{column: store_region, op: \"!=\", value: {p}}}"),
    "dimension domain": ("queries/campaign_reach.yaml", None, None),
    "query SQL comment": ("queries/campaign_reach.sql", "-- ", "-- {p} "),
    "query SQL string": ("queries/campaign_reach.sql", None, None),
    "description": ("collaboration.yaml", "description: Retailer x ad network campaign measurement.", "description: {p}"),
}


def _yaml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize(("field", "payload"), [(f, p) for f, p in itertools.product(sorted(FIELDS), payloads(29, 30)) if any(t in p for t in ("{{", "{%", "{#"))])
def test_policy_check_refuses_template_syntax_in_every_field_with_its_line(tmp_path: Path, field: str, payload: str) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    name, old, new = FIELDS[field]
    path = folder / name
    text = path.read_text()
    if field == "dimension domain":
        old, new = "    domain: [north, south, east, west]", "    domain: [north, south, east, west, {p}]"
    if field == "query SQL string":
        old, new = "where", "where 'x' <> {q} and"
    assert old in text, (field, old)
    line = text[: text.index(old)].count("\n") + 1
    value = _yaml_string(payload) if name.endswith(".yaml") else payload
    path.write_text(text.replace(old, new.format(p=value, q="'" + payload.replace("'", "''") + "'"), 1))
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    found = [i for i in caught.value.issues if "template tag" in i.message]
    assert found and found[0].file == path and found[0].line == line and found[0].column is not None, caught.value.issues


def _stub_env(calls: list[str]) -> jinja2.Environment:
    """dbt's Jinja as the models use it: these names and nothing else (anything else is an error)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701 (renders SQL, as dbt does)

    def record(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> str:
            calls.append(name)
            return f"<{name}>" if name not in ("config",) else ""
        return call

    allowed = ["ref", "source", "config", "dcr_param", "dcr_bound_contributions", "dcr_request_key", "dcr_upload_rows",
               "dcr_normalise_identifier", "dcr_identifier_problem", "dcr_keyed_token", "is_incremental", "this"]
    env.globals.update({name: record(name) for name in allowed})
    env.globals["target"] = {"type": "postgres"}
    return env


def _rendered(models: dict[Path, str], calls: list[str]) -> dict[Path, str]:
    env = _stub_env(calls)
    return {path: env.from_string(text).render() for path, text in models.items() if path.suffix == ".sql"}


@pytest.mark.parametrize("payload", payloads(2929, 120))
def test_past_the_check_a_payload_reaches_the_sql_only_as_data(payload: str) -> None:
    demo = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    purchases = demo.collaboration.datasets["purchases"]
    hostile_ds = purchases.model_copy(update={"row_filters": (RowFilter(column="store_region", op="in", value=["north", payload]),)})
    query = demo.queries["campaign_reach"]
    spec = query.spec.model_copy(update={"dimensions": {**query.spec.dimensions, "store_region": Dimension(domain=("north", payload))}})
    sql_text = f"-- {payload}\n" + query.sql.replace("where", f"where {exp.Literal.string(payload).sql(dialect='postgres')} <> 'x' and", 1)
    hostile_query = ApprovedQuery(query.name, spec, sql_text, query.spec_path, query.sql_path, query.sha256, query.datasets, query.placeholders)
    collab = demo.collaboration.model_copy(update={"datasets": {**demo.collaboration.datasets, "purchases": hostile_ds}})
    hostile = type(demo)(**{**demo.__dict__, "collaboration": collab, "queries": {**demo.queries, query.name: hostile_query}})
    calls: list[str] = []
    rendered = _rendered(dbt_codegen.render(hostile), calls)
    baseline_calls: list[str] = []
    _rendered(dbt_codegen.render(demo), baseline_calls)
    assert sorted(set(calls)) == sorted(set(baseline_calls)), "a payload called something the clean room's own models do not"
    normalised = rendered[Path("staging") / "int_demo__retailer__purchases.sql"]
    query_sql = rendered[Path("analysis") / "qry_demo__campaign_reach.sql"]
    for sql in (normalised, query_sql):
        literals = [lit.this for lit in sqlglot.parse_one(_plain(sql), read="postgres").find_all(exp.Literal) if lit.is_string]
        assert payload in literals, f"the payload is not one literal of the generated SQL:\n{sql}"
    # The comment stays for reviewers, as sqlglot wrote it (a "*/" in it cannot end it), and reads as the payload.
    comment = sqlglot.parse_one(f"-- {payload}\nselect 1", read="postgres").sql(dialect="postgres", pretty=True).split("\n")[0]
    assert comment in query_sql


def _plain(sql: str) -> str:
    """The rendered model with the stubs' markers made into names sqlglot can parse."""
    import re

    return re.sub(r"<(\w+)>", r"\1_stub", sql)


@pytest.mark.parametrize(("inserted", "said"), [
    ("length(dcr_keys.keyed_token('retailer', match_id))", "schema-qualified function"),
    ("length(keyed_token('retailer', match_id))", "function keyed_token()"),
    ("length(current_setting('dcr.hmac_retailer_inner'))", "function current_setting()"),
    ("length(pg_read_file('/proc/self/environ'))", "function pg_read_file()"),
    ("(select count(*) from dcr_keys.hmac_pads)", "refer to datasets by their logical name, not 'dcr_keys.hmac_pads'"),
    ("(select count(*) from dcr_meta.uploads)", "refer to datasets by their logical name, not 'dcr_meta.uploads'"),
])
def test_an_approved_query_cannot_reach_the_platform_even_if_a_reviewer_let_it_through(tmp_path: Path, inserted: str, said: str) -> None:
    """Keys, session settings, server files and the operator's tables are not the datasets: `policy check` refuses an
    approved query that names them, before any model is generated (dbt would run it as the collaboration's dbt login)."""
    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "queries" / "campaign_reach.sql"
    path.write_text(path.read_text().replace("sum(purchase_value) as spend", f"sum(purchase_value) + {inserted} as spend", 1))
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    found = [i for i in caught.value.issues if i.file == path and said in i.message]
    assert found, caught.value.issues
