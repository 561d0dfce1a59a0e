{{ config(schema="demo_raw_retailer", alias="identities", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "private", "ids_retailer"], "stage": "staging", "owner": "retailer"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"token\"") }}{% endif %}

select distinct "customer_email_token" as token, "customer_email" as identifier
from {{ ref('int_demo__retailer__purchases') }}
where "customer_email_token" is not null
union
select distinct "customer_email_token" as token, "customer_email" as identifier
from {{ ref('int_demo__retailer__customers') }}
where "customer_email_token" is not null
