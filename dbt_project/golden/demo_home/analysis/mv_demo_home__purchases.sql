{{ config(schema="demo_home_analysis", alias="matched_purchases", materialized="view", tags=["dcr_demo_home", "dcr_analysis"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "analysis", "matched_purchases"], "stage": "analysis"}}) }}

select
    xref.match_id,
    xref.unit as dcr_unit,
    {% if target.type == 'greenplum' %}staged.gp_segment_id::text || ':' || staged.ctid::text{% else %}staged.ctid{% endif %} as dcr_row,
    staged."purchase_value",
    staged."purchase_date",
    staged."store_region"
from {{ ref('stg_demo_home__retailer__purchases') }} as staged
inner join {{ source('demo_home_matching', 'cross_reference') }} as xref
    on xref."retailer_token" = staged."customer_email_token"
