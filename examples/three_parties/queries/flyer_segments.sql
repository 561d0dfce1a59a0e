-- Customers of all three parties, by airline status and bank segment.
select distinct
    flyers.match_id,
    flyers.status,
    accounts.segment
from flyers
inner join accounts on accounts.match_id = flyers.match_id
inner join subscribers on subscribers.match_id = flyers.match_id
