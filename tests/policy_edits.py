"""Edits of the demo policy that tests share: the exact (thresholded) mode of the demo's customers dataset, and the
threshold-rule query over it that the demo had before its customers were differentially private."""

from __future__ import annotations

from pathlib import Path

DP_RULE = """    analysis_rule:  # ad-hoc SQL with differential privacy: noised answers, each query charged to its runner's budget
      type: differential_privacy
      join_required: true
"""

EXACT_RULE = """    analysis_rule:  # AWS-style aggregation rule: no row leaves, every output row covers >= 25 shared customers
      type: aggregation
      min_distinct_units: 25
      join_required: true
"""


def exact_customers(text: str) -> str:
    """The demo's collaboration.yaml with customers under the exact aggregation rule (threshold 25), as before DP was the default."""
    start = text.index(DP_RULE)
    end = text.index("      scalar_functions:", start)
    return text[:start] + EXACT_RULE + text[end:]


THRESHOLD_TIER_REACH_YAML = """description: Shared customers who saw each campaign, by loyalty tier, and their average lifetime value (thresholded, no noise).
rule: threshold
min_distinct_units: 25
consumer: ad_network
receivers: [ad_network, retailer]
parameters:
  since:
    type: date
    default: "2026-01-01"
    min: "2020-01-01"
    max: "2030-12-31"
    description: Count impressions on or after this day.
dimensions:
  campaign_id: {}
  loyalty_tier: {}
metrics:
  buyers: {aggregate: count_units}
  lifetime_value: {aggregate: avg, column: lifetime_value, bounds: [0, 5000]}
contribution:
  max_groups_per_unit: 6
  max_rows_per_group: 1
"""

THRESHOLD_TIER_REACH_SQL = """-- Shared customers who saw each campaign, by loyalty tier, with their lifetime
-- value. Released without noise: groups under 25 people are removed.
select distinct
    exposed.match_id,
    exposed.campaign_id,
    customers.loyalty_tier,
    customers.lifetime_value
from impressions as exposed
inner join customers on customers.match_id = exposed.match_id
where exposed.impression_time >= cast(:since as timestamp)
"""


def threshold_tier_reach(folder: Path) -> None:
    """tier_reach as a threshold-rule query (exact values, groups under 25 people removed); needs exact customers and
    the parties' approval afterwards (approve_all)."""
    (folder / "queries" / "tier_reach.yaml").write_text(THRESHOLD_TIER_REACH_YAML)
    (folder / "queries" / "tier_reach.sql").write_text(THRESHOLD_TIER_REACH_SQL)
