"""Edits of the demo policy that tests share: the exact (thresholded) mode of the demo's customers dataset."""

from __future__ import annotations

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
