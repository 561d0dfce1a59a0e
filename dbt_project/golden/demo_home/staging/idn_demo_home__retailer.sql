{{ config(schema="demo_home_raw_retailer", alias="identities", tags=["dcr_demo_home", "dcr_staging"], meta={"dcr": {"collaboration": "demo_home", "asset_key": ["demo_home", "private", "ids_retailer"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"token\"") }}{% endif %}

select distinct "customer_email_token" as token, "customer_email" as identifier
from {{ ref('int_demo_home__retailer__purchases') }}
where "customer_email_token" is not null
union
select distinct "customer_email_token" as token, "customer_email" as identifier
from {{ ref('int_demo_home__retailer__customers') }}
where "customer_email_token" is not null
