"""Generated dbt SQL: datasets bound to matched views, parameters to typed macros, filters quoted."""

from __future__ import annotations

from dcr_pipelines.lib import dbt_codegen
from dcr_pipelines.lib.keys import hmac_pads
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.policy.models import RowFilter
from dcr_pipelines.lib.settings import PROJECT_ROOT

LOADED = load_collaboration(PROJECT_ROOT / "policies" / "demo")


def test_query_datasets_become_matched_views_and_params_become_typed_macros() -> None:
    sql = dbt_codegen.rewrite_query(LOADED, LOADED.queries["campaign_reach"])
    assert "{{ ref('mv_demo__purchases') }} AS purchases" in sql
    assert "{{ ref('mv_demo__impressions') }} AS impressions" in sql
    assert "{{ dcr_param('demo', 'campaign_reach', 'since', 'date') }}" in sql
    assert ":since" not in sql


def test_staging_keeps_only_shared_columns_and_tokens() -> None:
    ds = LOADED.collaboration.datasets["purchases"]
    sql = dbt_codegen.staging_sql(LOADED, "purchases", ds)
    assert '"customer_email_token"' in sql
    assert '"customer_email"\n' not in sql and '    "customer_email",' not in sql


def test_row_filter_values_are_quoted_not_spliced() -> None:
    flt = RowFilter(column="store_region", op="in", value=["north", "x'); drop table t; --"])
    assert dbt_codegen.row_filter_sql(flt) == "\"store_region\" in ('north', 'x''); drop table t; --')"


def test_hmac_pads_reproduce_python_hmac() -> None:
    import hashlib
    import hmac

    for key in (b"short", b"x" * 64, b"y" * 100):
        pads = hmac_pads(key)
        message = b"ana.1@example.com"
        manual = hashlib.sha256(pads.outer + hashlib.sha256(pads.inner + message).digest()).hexdigest()
        assert manual == hmac.new(key, message, hashlib.sha256).hexdigest()
