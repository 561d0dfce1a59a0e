-- Shared customers who saw any campaign, by the region they bought in, with
-- their spend there since the given day.
with exposed as (
    select distinct match_id
    from impressions
    where impression_time >= cast(:since as timestamp)
)

select
    purchases.match_id,
    purchases.store_region,
    sum(purchases.purchase_value) as spend
from purchases
inner join exposed on exposed.match_id = purchases.match_id
where purchases.purchase_date >= :since
group by purchases.match_id, purchases.store_region
