-- Shared customers who saw each campaign, by loyalty tier, with their lifetime
-- value. customers is under the differential_privacy rule, so only noised releases read it.
select distinct
    exposed.match_id,
    exposed.campaign_id,
    customers.loyalty_tier,
    customers.lifetime_value
from impressions as exposed
inner join customers on customers.match_id = exposed.match_id
where exposed.impression_time >= cast(:since as timestamp)
