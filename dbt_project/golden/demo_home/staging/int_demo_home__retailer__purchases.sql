{{ config(schema="demo_home_raw_retailer", alias="purchases__normalised", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "private", "norm_purchases"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"customer_email_token\"") }}{% endif %}

with source as (
    select * from {{ source('demo_home_raw_retailer', 'purchases') }}
),

normalised as (
    select
        "customer_email" as "customer_email__raw",
        {{ dcr_normalise_identifier('"customer_email"', 'email', {"gmail_drop_dots": false, "drop_plus_tag": false}) }} as "customer_email",
        "purchase_value",
        "purchase_date",
        "store_region"
    from source
    where "purchase_value" >= 0
)

select
    normalised."customer_email",
    {{ dcr_identifier_problem('normalised."customer_email__raw"', 'email', 'normalised."customer_email"') }} as "customer_email__problem",
    coalesce(normalised."customer_email" is distinct from normalised."customer_email__raw", false) and normalised."customer_email" is not null as "customer_email__changed",
    case when normalised."customer_email" is not null then {{ dcr_keyed_token('normalised."customer_email"', 'retailer') }} end as "customer_email_token",
    normalised."purchase_value",
    normalised."purchase_date",
    normalised."store_region"
from normalised
