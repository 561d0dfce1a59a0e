{{ config(schema="demo_analysis", alias="matched_impressions", materialized="view", tags=["dcr_demo", "dcr_analysis"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "analysis", "matched_impressions"], "stage": "analysis"}}) }}

select
    xref.match_id,
    xref.unit as dcr_unit,
    {% if target.type == 'greenplum' %}staged.gp_segment_id::text || ':' || staged.ctid::text{% else %}staged.ctid{% endif %} as dcr_row,
    staged."campaign_id",
    staged."impression_time"
from {{ ref('stg_demo__ad_network__impressions') }} as staged
inner join {{ source('demo_matching', 'cross_reference') }} as xref
    on xref."ad_network_token" = staged."user_email_token"
