{{ config(schema="demo_staging_ad_network", alias="impressions", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "staging", "secure_impressions"], "stage": "staging", "owner": "ad_network"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"user_email_token\"") }}{% endif %}

select
    "user_email_token",
    "campaign_id",
    "impression_time"
from {{ ref('int_demo__ad_network__impressions') }}
where "user_email_token" is not null
