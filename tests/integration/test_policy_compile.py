"""`dcr policy check` compiles approved queries: of 200 generated queries over the demo's datasets, every one the check
accepts is planned by PostgreSQL (EXPLAIN over empty tables with the datasets' columns and types), and every one it
refuses holds a planted mistake (a column typo, a column of the wrong dataset, an unknown dataset, an output the
YAML names but the SQL does not give), named with its file and line."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.policy import PolicyError, load_collaboration
from dcr_pipelines.lib.policy.loader import _load_query
from dcr_pipelines.lib.policy.models import ColumnType
from dcr_pipelines.lib.settings import PROJECT_ROOT

SCHEMA = "policy_compile"
TYPES = {ColumnType.TEXT: "text", ColumnType.NUMERIC: "numeric", ColumnType.DATE: "date", ColumnType.TIMESTAMP: "timestamp",
         ColumnType.INTEGER: "bigint", ColumnType.BOOLEAN: "boolean"}


@pytest.fixture(scope="module")
def demo(runtime) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    with psycopg.connect(runtime.warehouse.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("create schema {}").format(sql.Identifier(SCHEMA)))
        for name, ds in loaded.collaboration.datasets.items():
            columns = [sql.SQL("match_id text")] + [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(TYPES[ds.columns[c].type]))
                                                     for c in ds.shared_columns]
            conn.execute(sql.SQL("create table {} ({})").format(sql.Identifier(SCHEMA, f"matched_{name}"), sql.SQL(", ").join(columns)))
    return {"loaded": loaded, "url": runtime.warehouse.url()}


def generate(rng: random.Random, loaded: Any) -> tuple[str, str, str | None]:
    """(query YAML, query SQL, the planted mistake or None)."""
    datasets = loaded.collaboration.datasets
    names = rng.sample(sorted(datasets), rng.choice([1, 2]))
    aliases = {name: f"t{i}" for i, name in enumerate(names)}
    typed = {(name, c): datasets[name].columns[c].type for name in names for c in datasets[name].shared_columns}
    keys = [k for k, t in typed.items() if t in (ColumnType.TEXT, ColumnType.DATE)]
    numbers = [k for k, t in typed.items() if t in (ColumnType.NUMERIC, ColumnType.INTEGER)]
    dims = rng.sample(keys, min(len(keys), rng.choice([1, 2])))
    measure = rng.choice(numbers) if numbers and rng.random() < 0.8 else None
    outputs = [f"{aliases[n]}.{c}" for n, c in dims] + ([f"{aliases[measure[0]]}.{measure[1]}"] if measure else [])
    first = names[0]
    text = f"select {aliases[first]}.match_id, " + ", ".join(outputs) + f"\nfrom {first} as {aliases[first]}"
    for other in names[1:]:
        text += f"\ninner join {other} as {aliases[other]} on {aliases[other]}.match_id = {aliases[first]}.match_id"
    dated = [k for k, t in typed.items() if t in (ColumnType.DATE, ColumnType.TIMESTAMP)]
    params = ""
    if dated and rng.random() < 0.6:
        n, c = rng.choice(dated)
        cast = "timestamp" if typed[(n, c)] == ColumnType.TIMESTAMP else "date"
        text += f"\nwhere {aliases[n]}.{c} >= cast(:since as {cast})"
        params = 'parameters:\n  since: {type: date, default: "2026-01-01"}\n'
    mistake = None
    roll = rng.random()
    if roll < 0.12:  # a typo in a column the query reads
        mistake = "typo"
        used = [f"{aliases[n]}.{c}" for n, c in typed if f"{aliases[n]}.{c}" in text]
        column = rng.choice(used)
        text = text.replace(column, column[:-1], 1)
    elif roll < 0.20:  # a column of a dataset the query does not read, through an alias that reads another
        wrong = next(o for o in sorted(datasets) if o not in names)
        column = next((c for c in sorted(datasets[wrong].shared_columns) if c not in datasets[first].shared_columns), None)
        if column is not None:
            mistake = "wrong dataset"
            text += ("\n  and " if "where" in text else "\nwhere ") + f"{aliases[first]}.{column} is not null"
    elif roll < 0.26:
        mistake = "unknown dataset"
        text = text.replace(f"from {first} as", f"from {first}s as", 1)
    dimensions = "".join(f"  {c}: {{key_selection_delta: 1.0e-6}}\n" for _, c in dims)
    metrics = "  people: {aggregate: count_units}\n"
    if measure:
        metrics += f"  total: {{aggregate: sum, column: {measure[1]}, bounds: [0, 1000]}}\n"
    if rng.random() < 0.06 and mistake is None:
        mistake = "missing output"
        dimensions += "  nowhere: {key_selection_delta: 1.0e-6}\n"
    spec = f"rule: dp\nconsumer: ad_network\nreceivers: [ad_network]\n{params}dimensions:\n{dimensions}metrics:\n{metrics}privacy: {{epsilon: 1.0}}\n"
    return spec, text + "\n", mistake


def _explainable(conn: psycopg.Connection, query: Any, loaded: Any) -> str:
    """The approved SQL as the model runs it, its refs and parameters made plain: the matched views are the empty tables."""
    rendered = dbt_codegen.rewrite_query(loaded, query)
    rendered = re.sub(r"\{\{ ref\('mv_demo__(\w+)'\) \}\}", lambda m: f'"{SCHEMA}".matched_{m.group(1)}', rendered)
    rendered = re.sub(r"\{\{ dcr_param\('[^']*', '[^']*', '[^']*', '(\w+)'\) \}\}", lambda m: f"cast(null as {m.group(1)})", rendered)
    assert "{{" not in rendered, rendered
    return rendered


def test_every_query_the_check_accepts_is_planned_by_postgresql_and_every_refusal_names_a_planted_mistake(demo: dict[str, Any], tmp_path: Path) -> None:
    rng = random.Random(2905)
    loaded = demo["loaded"]
    accepted = refused = 0
    with psycopg.connect(demo["url"], autocommit=True) as conn:
        for n in range(200):
            spec_text, sql_text, mistake = generate(rng, loaded)
            spec = tmp_path / f"q{n}.yaml"
            spec.write_text(spec_text)
            (tmp_path / f"q{n}.sql").write_text(sql_text)
            try:
                query = _load_query(spec, loaded.collaboration)
            except PolicyError as exc:
                refused += 1
                assert mistake is not None, f"a query without a mistake was refused:\n{sql_text}\n{spec_text}\n{exc}"
                assert all(i.file in (spec, tmp_path / f"q{n}.sql") for i in exc.issues)
                if mistake == "typo":
                    assert any(i.line is not None and "did you mean" in i.message for i in exc.issues), exc.issues
                continue
            accepted += 1
            assert mistake is None, f"the check missed a {mistake}:\n{sql_text}\n{spec_text}"
            statement = _explainable(conn, query, loaded)
            try:
                conn.execute(f"explain select * from ({statement}) as q")  # type: ignore[arg-type]
            except psycopg.Error as exc:
                pytest.fail(f"a query the check accepted does not plan ({exc.diag.message_primary}):\n{sql_text}")
    assert accepted >= 120 and refused >= 30, (accepted, refused)
