{{ config(schema="demo_analysis", alias="query_region_spend", materialized="view", tags=["dcr_demo", "dcr_analysis"], meta={"dcr": {"collaboration": "demo", "asset_key": ["demo", "analysis", "pre_noise_region_spend"], "stage": "analysis"}}) }}

with unit_rows as (
    /* Shared customers who saw any campaign, by the region they bought in, with */
    /* their spend there since the given day. */
    WITH exposed AS (
      SELECT DISTINCT
        match_id
      FROM {{ ref('mv_demo__impressions') }} AS impressions
      WHERE
        impression_time >= CAST({{ dcr_param('demo', 'region_spend', 'since', 'date') }} AS TIMESTAMP)
    )
    SELECT
      purchases.match_id,
      purchases.store_region,
      SUM(purchases.purchase_value) AS spend
    FROM {{ ref('mv_demo__purchases') }} AS purchases
    INNER JOIN exposed
      ON exposed.match_id = purchases.match_id
    WHERE
      purchases.purchase_date >= {{ dcr_param('demo', 'region_spend', 'since', 'date') }}
    GROUP BY
      purchases.match_id,
      purchases.store_region
),

in_domain as (
    select * from unit_rows
    where match_id is not null and "store_region" in ('north', 'south', 'east', 'west')
),

bounded as (
    {{ dcr_bound_contributions('in_domain', 'match_id', ["store_region"], 1, 4) }}
)

select
    "store_region",
    count(distinct match_id) as "buyers",
    coalesce(sum(least(greatest(cast("spend" as numeric), 0.0), 500.0)), 0) as "spend__sum",
    {{ dcr_request_key('demo', 'region_spend') }} as "dcr_request"
from bounded
group by "store_region"
