{{ config(schema="demo_staging_retailer", alias="purchases", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "staging", "secure_purchases"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"customer_email_token\"") }}{% endif %}

select
    "customer_email_token",
    "purchase_value",
    "purchase_date",
    "store_region"
from {{ ref('int_demo__retailer__purchases') }}
where "customer_email_token" is not null
