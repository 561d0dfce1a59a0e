{{ config(materialized="incremental", on_schema_change="append_new_columns", schema="demo_raw_ad_network", alias="impressions__normalised", tags=["dcr_demo", "dcr_staging"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "private", "norm_impressions"], "stage": "staging", "owner": "ad_network"}}) }}{% if target.type == 'greenplum' %}{{ config(distributed_by="\"user_email_token\"") }}{% endif %}

with source as (
    {{ dcr_upload_rows(source('demo_raw_ad_network', 'impressions'), 'demo', 'ad_network', 'impressions', ["user_email", "campaign_id", "impression_time"]) }}
),

normalised as (
    select
        "user_email" as "user_email__raw",
        {{ dcr_normalise_identifier('"user_email"', 'email', {"gmail_drop_dots": false, "drop_plus_tag": false}) }} as "user_email",
        "campaign_id",
        "impression_time",
        _dcr_part
    from source
    where true
)

select
    normalised."user_email",
    {{ dcr_identifier_problem('normalised."user_email__raw"', 'email', 'normalised."user_email"') }} as "user_email__problem",
    coalesce(normalised."user_email" is distinct from normalised."user_email__raw", false) and normalised."user_email" is not null as "user_email__changed",
    case when normalised."user_email" is not null then {{ dcr_keyed_token('normalised."user_email"', 'ad_network') }} end as "user_email_token",
    normalised."campaign_id",
    normalised."impression_time",
    normalised._dcr_part
from normalised
