{{ config(schema="demo_analysis", alias="query_campaign_reach", materialized="view", tags=["dcr_demo", "dcr_analysis"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "analysis", "pre_noise_campaign_reach"], "stage": "analysis"}}) }}

with unit_rows as (
    /* One row per (shared customer, campaign seen, region bought in) with the */
    /* customer's spend there. The release bounds, clamps and noises it. */
    WITH exposed AS (
      SELECT DISTINCT
        match_id,
        campaign_id
      FROM {{ ref('mv_demo__impressions') }} AS impressions
      WHERE
        impression_time >= CAST({{ dcr_param('demo', 'campaign_reach', 'since', 'date') }} AS TIMESTAMP)
    ), spend AS (
      SELECT
        match_id,
        store_region,
        SUM(purchase_value) AS spend
      FROM {{ ref('mv_demo__purchases') }} AS purchases
      WHERE
        purchase_date >= {{ dcr_param('demo', 'campaign_reach', 'since', 'date') }}
      GROUP BY
        match_id,
        store_region
    )
    SELECT
      exposed.match_id,
      exposed.campaign_id,
      spend.store_region,
      spend.spend
    FROM exposed
    INNER JOIN spend
      ON spend.match_id = exposed.match_id
),

in_domain as (
    select * from unit_rows
    where match_id is not null and "campaign_id" in ('spring_sale', 'summer_launch', 'back_to_school', 'black_friday', 'holiday_gifts', 'new_year') and "store_region" in ('north', 'south', 'east', 'west')
),

bounded as (
    {{ dcr_bound_contributions('in_domain', 'match_id', ["campaign_id", "store_region"], 1, 3) }}
)

select
    "campaign_id", "store_region",
    count(distinct match_id) as "buyers",
    coalesce(sum(least(greatest(cast("spend" as numeric), 0.0), 300.0)), 0) as "spend__sum",
    {{ dcr_request_key('demo', 'campaign_reach') }} as "dcr_request"
from bounded
group by "campaign_id", "store_region"
