{{ config(schema="demo_analysis", alias="query_tier_reach", tags=["dcr_demo", "dcr_analysis"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "analysis", "tier_reach__pre_noise"], "stage": "analysis"}}) }}

with unit_rows as (
    /* Shared customers who saw each campaign, by loyalty tier, with their lifetime */
    /* value. Released without noise: groups under 25 people are removed. */
    SELECT DISTINCT
      exposed.match_id,
      exposed.campaign_id,
      customers.loyalty_tier,
      customers.lifetime_value
    FROM {{ ref('mv_demo__impressions') }} AS exposed
    INNER JOIN {{ ref('mv_demo__customers') }} AS customers
      ON customers.match_id = exposed.match_id
    WHERE
      exposed.impression_time >= CAST({{ dcr_param('demo', 'tier_reach', 'since', 'date') }} AS TIMESTAMP)
),

in_domain as (
    select * from unit_rows
    where match_id is not null and true
),

bounded as (
    {{ dcr_bound_contributions('in_domain', 'match_id', ["campaign_id", "loyalty_tier"], 1, 6) }}
),

with_units as (
    select bounded.*, xref.unit as dcr_unit
    from bounded
    inner join {{ source('demo_matching', 'cross_reference') }} as xref on xref.match_id = bounded.match_id
)

select
    "campaign_id", "loyalty_tier",
    count(distinct match_id) as "buyers",
    coalesce(sum(least(greatest(cast("lifetime_value" as numeric), 0.0), 5000.0)), 0) as "lifetime_value__sum",
    count(*) as "lifetime_value__count",
    count(distinct match_id) as "dcr_units",
    array_agg(distinct dcr_unit order by dcr_unit) as "dcr_people",
    {{ dcr_request_key('demo', 'tier_reach') }} as "dcr_request"
from with_units
group by "campaign_id", "loyalty_tier"
