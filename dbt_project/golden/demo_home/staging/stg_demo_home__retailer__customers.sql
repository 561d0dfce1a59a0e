{{ config(schema="demo_home_staging_retailer", alias="customers", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "staging", "secure_customers"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"customer_email_token\"") }}{% endif %}

select
    "customer_email_token",
    "loyalty_tier",
    "age_band",
    "lifetime_value"
from {{ ref('int_demo_home__retailer__customers') }}
where "customer_email_token" is not null
