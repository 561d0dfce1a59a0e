{{ config(schema="demo_staging_retailer", alias="customers", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "staging", "secure_customers"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"customer_email_token\"") }}{% endif %}

select
    "customer_email_token",
    "loyalty_tier",
    "age_band",
    "lifetime_value"
from {{ ref('int_demo__retailer__customers') }}
where "customer_email_token" is not null
