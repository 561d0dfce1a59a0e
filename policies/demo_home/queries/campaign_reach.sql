-- One row per (shared customer, campaign seen, region bought in) with the
-- customer's spend there. The release bounds, clamps and noises it.
with exposed as (
    select distinct match_id, campaign_id
    from impressions
    where impression_time >= cast(:since as timestamp)
),

spend as (
    select match_id, store_region, sum(purchase_value) as spend
    from purchases
    where purchase_date >= :since
    group by match_id, store_region
)

select
    exposed.match_id,
    exposed.campaign_id,
    spend.store_region,
    spend.spend
from exposed
inner join spend on spend.match_id = exposed.match_id
