{{ config(schema="demo_home_raw_ad_network", alias="impressions__normalised", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "private", "norm_impressions"], "stage": "staging", "owner": "ad_network"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"user_email_token\"") }}{% endif %}

select
    case when lower(btrim("user_email")) ~ '^[0-9a-f]{64}$' then lower(btrim("user_email")) end as "user_email",
    case when "user_email" is null or btrim("user_email") = '' then 'missing' when lower(btrim("user_email")) !~ '^[0-9a-f]{64}$' then 'invalid_token' end as "user_email__problem",
    case when lower(btrim("user_email")) ~ '^[0-9a-f]{64}$' then lower(btrim("user_email")) end as "user_email_token",
    "campaign_id",
    "impression_time"
from {{ source('demo_home_raw_ad_network', 'impressions') }}
where true
