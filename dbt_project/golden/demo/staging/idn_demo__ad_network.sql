{{ config(schema="demo_raw_ad_network", alias="identities", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "private", "ids_ad_network"], "stage": "staging", "owner": "ad_network"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"token\"") }}{% endif %}

select distinct "user_email_token" as token, "user_email" as identifier
from {{ ref('int_demo__ad_network__impressions') }}
where "user_email_token" is not null
