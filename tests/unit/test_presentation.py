"""Released values as people read them: counts whole, amounts with two decimals, intervals beside them."""

from __future__ import annotations

from dcr_pipelines.lib.policy.models import MetricKind, QuerySpec
from dcr_pipelines.lib.presentation import format_cell, format_value, release_table
from dcr_pipelines.services.release import whole_counts

SPEC = QuerySpec.model_validate({
    "consumer": "ad_network", "receivers": ["ad_network"], "rule": "dp", "privacy": {"epsilon": 1.0},
    "dimensions": {"region": {"domain": ["north", "south"]}},
    "metrics": {"buyers": {"aggregate": "count_units"}, "spend": {"aggregate": "avg", "column": "v", "bounds": [0, 100]}},
    "contribution": {"max_groups_per_unit": 1, "max_rows_per_group": 1},
})


def test_a_count_is_a_whole_number_everywhere_and_an_amount_keeps_two_decimals() -> None:
    assert format_value(MetricKind.COUNT_UNITS, 251.0) == "251" and format_value(MetricKind.COUNT, 1234.6) == "1,235"
    assert format_value(MetricKind.AVG, 12.5) == "12.50" and format_value(MetricKind.SUM, None) == "-"
    assert format_cell(MetricKind.COUNT_UNITS, {"value": 10.2, "ci_low": -3.7, "ci_high": 24.1}) == "10 [-4, 24]"


def test_whole_counts_rounds_counts_and_widens_their_intervals_to_whole_numbers_only() -> None:
    rows = [{"region": "north", "metric": "buyers", "value": 10.6, "ci_low": -3.2, "ci_high": 24.4},
            {"region": "north", "metric": "spend", "value": 10.6, "ci_low": 3.2, "ci_high": 24.4}]
    buyers, spend = whole_counts(SPEC, rows)
    assert (buyers["value"], buyers["ci_low"], buyers["ci_high"]) == (11, -4, 25) and isinstance(buyers["value"], int)
    assert (spend["value"], spend["ci_low"], spend["ci_high"]) == (10.6, 3.2, 24.4)


def test_the_release_table_has_one_row_per_group_and_says_what_its_brackets_are() -> None:
    rows = [{"region": r, "metric": m, "value": v, "ci_low": v - 1, "ci_high": v + 1} for r in ("north", "south") for m, v in (("buyers", 5), ("spend", 2.5))]
    table = release_table(SPEC, rows)
    assert table.headers == ["region", "buyers (95% interval)", "spend (95% interval)"]
    assert table.rows == [["north", "5 [4, 6]", "2.50 [1.50, 3.50]"], ["south", "5 [4, 6]", "2.50 [1.50, 3.50]"]]
    assert "95% interval" in table.note and table.markdown().startswith("| region | buyers (95% interval) |")


def test_the_asset_page_shortens_large_values_and_keeps_small_ones_exact() -> None:
    """The release preview on the asset page must fit beside Dagster's panels: three significant digits, k from 1,000 on."""
    assert format_value(MetricKind.COUNT_UNITS, 251.0, compact=True) == "251" and format_value(MetricKind.COUNT, 999.4, compact=True) == "999"
    assert format_value(MetricKind.COUNT, 2000.0, compact=True) == "2k"
    assert format_value(MetricKind.COUNT, 12345.0, compact=True) == "12.3k" and format_value(MetricKind.SUM, 1_234_567.8, compact=True) == "1.23M"
    assert format_value(MetricKind.SUM, -2.5e9, compact=True) == "-2.5B" and format_value(MetricKind.AVG, 1234.56, compact=True) == "1.23k"
    assert format_value(MetricKind.AVG, 12.5, compact=True) == "12.5" and format_value(MetricKind.AVG, 557.07, compact=True) == "557"
    assert format_value(MetricKind.AVG, 0.0, compact=True) == "0" and format_value(MetricKind.SUM, 3.14159, compact=True) == "3.14"
    wide = {"value": 1_234_567.8, "ci_low": 1_200_100.0, "ci_high": 1_269_035.6}
    assert format_cell(MetricKind.SUM, wide) == "1,234,567.80 [1,200,100.00, 1,269,035.60]"  # the CLI and exports: in full
    assert format_cell(MetricKind.SUM, wide, compact=True) == "1.23M [1.2M, 1.27M]"
    rows = [{"region": "north", "metric": m, "value": v, "ci_low": v - 1, "ci_high": v + 1} for m, v in (("buyers", 50_000), ("spend", 2.5))]
    table = release_table(SPEC, rows, compact=True)
    assert table.headers == ["region", "buyers", "spend"] and "95% interval" in table.note  # the note says what the brackets are
    assert table.rows == [["north", "50k [50k, 50k]", "2.5 [1.5, 3.5]"]] and "shortened" in table.note
