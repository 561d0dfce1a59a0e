"""Query parameters are typed and bounded before any SQL exists; injection attempts are refused."""

from __future__ import annotations

import pytest

from dcr_pipelines.lib.params import ParameterError, validate_params
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

QUERY = load_collaboration(PROJECT_ROOT / "policies" / "demo").queries["campaign_reach"]


def test_defaults_fill_missing_parameters() -> None:
    assert validate_params(QUERY, {}) == {"since": "2026-01-01"}


def test_a_valid_date_is_normalised() -> None:
    assert validate_params(QUERY, {"since": " 2026-03-05 "}) == {"since": "2026-03-05"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-01-01'; drop table demo_results.budget_ledger; --", "is not a valid date"),
        ("2026-13-01", "is not a valid date"),
        ("yesterday", "is not a valid date"),
        ("2019-12-31", "below the minimum"),
        ("2031-01-01", "above the maximum"),
    ],
)
def test_bad_values_are_refused_with_the_rule(value: str, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        validate_params(QUERY, {"since": value})


def test_an_unknown_parameter_is_refused() -> None:
    with pytest.raises(ParameterError, match="has no parameter 'until'"):
        validate_params(QUERY, {"until": "2026-01-01"})
