{{ config(schema="demo_analysis", alias="query_tier_reach", materialized="view", tags=["dcr_demo", "dcr_analysis"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "analysis", "pre_noise_tier_reach"], "stage": "analysis"}}) }}

with unit_rows as (
    /* Shared customers who saw each campaign, by loyalty tier, with their lifetime */
    /* value. customers is under the differential_privacy rule, so only noised releases read it. */
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
    where match_id is not null and "campaign_id" in ('spring_sale', 'summer_launch', 'back_to_school', 'black_friday', 'holiday_gifts', 'new_year') and "loyalty_tier" in ('bronze', 'silver', 'gold')
),

bounded as (
    {{ dcr_bound_contributions('in_domain', 'match_id', ["campaign_id", "loyalty_tier"], 1, 6) }}
)

select
    "campaign_id", "loyalty_tier",
    count(distinct match_id) as "buyers",
    coalesce(sum(least(greatest(cast("lifetime_value" as numeric), 0.0), 2000.0)), 0) as "lifetime_value__sum",
    count(*) as "lifetime_value__count",
    {{ dcr_request_key('demo', 'tier_reach') }} as "dcr_request"
from bounded
group by "campaign_id", "loyalty_tier"
