{{ config(schema="demo_home_staging_ad_network", alias="impressions", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "staging", "secure_impressions"], "stage": "staging", "owner": "ad_network"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"user_email_token\"") }}{% endif %}

select
    "user_email_token",
    "campaign_id",
    "impression_time"
from {{ ref('int_demo_home__ad_network__impressions') }}
where "user_email_token" is not null
