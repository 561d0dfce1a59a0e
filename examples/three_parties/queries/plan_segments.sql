-- Shared customers of the bank and the telecom, by plan and segment.
select distinct
    subscribers.match_id,
    subscribers.plan,
    accounts.segment
from subscribers
inner join accounts on accounts.match_id = subscribers.match_id
