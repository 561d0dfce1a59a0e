{{ config(schema="demo_home_staging_retailer", alias="purchases", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "staging", "secure_purchases"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"customer_email_token\"") }}{% endif %}

select
    "customer_email_token",
    "purchase_value",
    "purchase_date",
    "store_region"
from {{ ref('int_demo_home__retailer__purchases') }}
where "customer_email_token" is not null
