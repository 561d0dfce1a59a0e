"""Generated SQL stays within PostgreSQL 12 (Greenplum 7 / Apache Cloudberry): no newer feature in any statement we write."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

# Functions and syntax added in PostgreSQL 13 or later.
NEWER_THAN_12 = {
    "gen_random_uuid (13)": r"\bgen_random_uuid\s*\(",
    "MERGE (15)": r"\bmerge\s+into\b",
    "any_value (16)": r"\bany_value\s*\(",
    "regexp_count/like/substr/instr (15)": r"\bregexp_(count|like|substr|instr)\s*\(",
    "date_bin (14)": r"\bdate_bin\s*\(",
    "string_to_table (14)": r"\bstring_to_table\s*\(",
    "trim_array (14)": r"\btrim_array\s*\(",
    "bit_count (14)": r"\bbit_count\s*\(",
    "unistr (14)": r"\bunistr\s*\(",
    "range_agg / multiranges (14)": r"\b(range_agg|multirange)\b",
    "NULLS NOT DISTINCT (15)": r"\bnulls\s+not\s+distinct\b",
    "IS JSON / SQL/JSON constructors (16)": r"\bis\s+json\b|\bjson_(array|object|table|query|exists|value)\s*\(",
    "random_normal (16)": r"\brandom_normal\s*\(",
    "negative split_part index (14)": r"\bsplit_part\s*\([^()]*,\s*-\d",
    "FETCH ... WITH TIES (13)": r"\bwith\s+ties\b",
    "ltrim/rtrim/btrim on bytea (14)": r"\b[lrb]trim\s*\(\s*'\\\\x",
}


@functools.cache
def _sources() -> dict[str, str]:
    texts = {str(p.relative_to(PROJECT_ROOT)): p.read_text() for p in (PROJECT_ROOT / "dbt_project" / "macros").rglob("*.sql")}
    texts |= {str(p.relative_to(PROJECT_ROOT)): p.read_text() for p in (PROJECT_ROOT / "dcr_pipelines").rglob("*.py")}
    for folder in sorted(p for p in (PROJECT_ROOT / "policies").iterdir() if p.is_dir()):
        loaded = load_collaboration(folder)
        texts |= {f"generated:{loaded.name}/{rel}": content for rel, content in dbt_codegen.render(loaded).items()}
        texts |= {f"{folder.name}/queries/{q.name}.sql": q.sql for q in loaded.queries.values()}
    return texts


@pytest.mark.parametrize("feature", sorted(NEWER_THAN_12))
def test_no_sql_feature_newer_than_postgresql_12(feature: str) -> None:
    pattern = re.compile(NEWER_THAN_12[feature], re.IGNORECASE)
    found = [name for name, text in _sources().items() if pattern.search(text)]
    assert not found, f"{feature} in {found}"


def test_the_lint_catches_a_newer_feature() -> None:
    assert re.search(NEWER_THAN_12["gen_random_uuid (13)"], "select gen_random_uuid()", re.IGNORECASE)
    assert re.search(NEWER_THAN_12["negative split_part index (14)"], "split_part(email, '@', -1)", re.IGNORECASE)


def test_token_tables_declare_a_distribution_key_for_greenplum_only() -> None:
    files = dbt_codegen.render(load_collaboration(PROJECT_ROOT / "policies" / "demo"))
    for name in ("stg_demo__retailer__purchases.sql", "int_demo__retailer__purchases.sql", "idn_demo__retailer.sql"):
        assert "{% if target.type == 'greenplum' %}{{ config(distributed_by=" in files[Path("staging") / name], name
