"""Contribution bounds hold for any group values: the dbt macro, rendered and run on PostgreSQL.

One person holds 10,000 rows spread over groups whose values contain the old
separator, NULLs (which ``concat_ws`` skipped), empty strings, quotes,
parentheses, commas and unicode. After bounding, that person may keep at most
``max_groups_per_unit`` groups and ``max_rows_per_group`` rows in each, so
the sensitivity handed to opendp stays true.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import jinja2
import psycopg
import pytest

from dcr_pipelines.lib.settings import PROJECT_ROOT

MACRO = PROJECT_ROOT / "dbt_project" / "macros" / "privacy" / "bounded_contributions.sql"
# The macro this replaced (a joined string as the group's identity): the defence switched off.
OLD_MACRO = """{% macro dcr_bound_contributions(relation, unit, group_columns, max_rows_per_group, max_groups_per_unit) -%}
    {%- set group_key = "concat_ws('|', " ~ (group_columns | join(", ")) ~ ")" -%}
    with ranked_rows as (select *, row_number() over (partition by {{ unit }}, {{ group_columns | join(", ") }}
                         order by md5(cast(row_to_json(r) as text))) as dcr_row_rank from {{ relation }} as r),
    kept_rows as (select * from ranked_rows where dcr_row_rank <= {{ max_rows_per_group }}),
    ranked_groups as (select *, dense_rank() over (partition by {{ unit }} order by md5(cast({{ unit }} as text) || {{ group_key }}))
                      as dcr_group_rank from kept_rows)
    select * from ranked_groups where dcr_group_rank <= {{ max_groups_per_unit }}
{%- endmacro %}"""

VALUES = [None, "", "a", "a|b", "|", "a|", "|b", "b", "(x,y)", '"q"', "naïve", "日本", "Ω|Ω", " ", "\\", "NULL", "null", "a,b", "()", "x" * 300]


def render(macro: str, groups: list[str], rows: int, max_groups: int) -> str:
    env = jinja2.Environment()  # noqa: S701 (renders SQL, not HTML)
    template = env.from_string(macro + "\n{{ dcr_bound_contributions('contributions', 'unit', " + repr(groups) + f", {rows}, {max_groups}) }}}}")
    return template.render()


@pytest.fixture(scope="module")
def table(runtime) -> Any:  # type: ignore[no-untyped-def]
    url = runtime.warehouse.url()
    rng = random.Random(42)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop table if exists contributions")
        conn.execute("create table contributions (unit text, d1 text, d2 text, v numeric)")
        rows = [("heavy", rng.choice(VALUES), rng.choice(VALUES), rng.random()) for _ in range(10_000)]
        # collisions under the old key: ('a|b', NULL) vs ('a', 'b') vs ('a|b', '') ...
        rows += [("heavy", "a|b", None, 1), ("heavy", "a", "b", 1), ("heavy", "a|b", "", 1), ("heavy", None, "a|b", 1)]
        rows += [("collider", d1, d2, 1) for d1, d2 in [("a|b", None), (None, "a|b"), ("a", "b")] * 3]  # one old key, three groups
        rows += [(f"p{i}", rng.choice(VALUES), rng.choice(VALUES), 1) for i in range(500)]
        with conn.cursor().copy("copy contributions from stdin") as copy:
            for row in rows:
                copy.write_row(row)
    return url


def _worst(url: str, statement: str) -> tuple[int, int]:
    """(most groups kept by one unit, most rows kept in one (unit, group))."""
    with psycopg.connect(url, autocommit=True) as conn:
        groups = conn.execute(f"select max(n) from (select unit, count(*) as n from (select distinct unit, d1, d2 from ({statement}) b) g group by unit) x").fetchone()[0]
        rows = conn.execute(f"select max(n) from (select count(*) as n from ({statement}) b group by unit, d1, d2) x").fetchone()[0]
    return int(groups), int(rows)


@pytest.mark.parametrize(("max_rows", "max_groups"), [(1, 1), (1, 3), (2, 2), (5, 4)])
def test_one_person_keeps_at_most_the_declared_groups_and_rows_whatever_the_values(table: str, max_rows: int, max_groups: int) -> None:
    groups, rows = _worst(table, render(MACRO.read_text(), ["d1", "d2"], max_rows, max_groups))
    assert groups <= max_groups and rows <= max_rows


def test_the_joined_string_key_let_one_person_keep_more_groups(table: str) -> None:
    groups, _ = _worst(table, render(OLD_MACRO, ["d1", "d2"], 1, 1))
    assert groups == 3  # the defence off: three groups with one joined key count as one


def test_one_group_column_and_none_are_bounded_too(table: str) -> None:
    assert _worst(table, render(MACRO.read_text(), ["d1"], 1, 2))[0] <= 2
    with psycopg.connect(table, autocommit=True) as conn:
        kept = conn.execute(f"select unit, count(*) from ({render(MACRO.read_text(), [], 3, 1)}) b group by unit").fetchall()
    assert max(n for _, n in kept) <= 3


def test_the_same_input_keeps_the_same_rows(table: str) -> None:
    statement = render(MACRO.read_text(), ["d1", "d2"], 2, 3)
    with psycopg.connect(table, autocommit=True) as conn:
        first, second = (sorted(conn.execute(f"select unit, d1, d2, v from ({statement}) b").fetchall(), key=repr) for _ in range(2))
    assert first == second and list(itertools.islice(first, 1))
