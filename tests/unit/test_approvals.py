"""Approvals follow exposure: every party approves every query, and a change that loosens a party's protections
needs that party's new approval, while tightening needs none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dcr_pipelines.lib.policy import PolicyError, load_collaboration
from dcr_pipelines.lib.policy.approve import NothingToApprove, approve, approve_all
from dcr_pipelines.lib.policy.loader import query_hash
from dcr_pipelines.lib.settings import PROJECT_ROOT


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    return folder


def _edit(folder: Path, old: str, new: str) -> None:
    path = folder / "collaboration.yaml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _issues(folder: Path) -> list[str]:
    try:
        load_collaboration(folder)
    except PolicyError as exc:
        return [str(i) for i in exc.issues]
    return []


LOOSENING = [
    ("    epsilon: 10.0", "    epsilon: 1000.0", "budgets[0].epsilon", {"retailer", "ad_network"}),
    ("    period_days: 30", "    period_days: 1", "budgets[0].period_days", {"retailer", "ad_network"}),
    ("      epsilon_per_query: 1.0", "      epsilon_per_query: 5.0", "datasets.customers.analysis_rule.epsilon_per_query", {"retailer"}),
    ("      key_selection_delta: 1.0e-6", "      key_selection_delta: 1.0e-4", "datasets.customers.analysis_rule.key_selection_delta", {"retailer"}),
    ("      type: differential_privacy\n      join_required: true", "      type: differential_privacy\n      join_required: false",
     "datasets.customers.analysis_rule.join_required", {"retailer"}),
    ("      type: differential_privacy\n", "      type: aggregation\n      min_distinct_units: 25\n", "datasets.customers.analysis_rule.type", {"retailer"}),
    ("    analysis_rule: {type: dp}", "    analysis_rule: {type: aggregation, join_operators: [and]}", "datasets.purchases.analysis_rule", {"retailer"}),
    ("lifetime_value: {type: numeric, nullable: false, aggregate: [sum, avg]", "lifetime_value: {type: numeric, nullable: false, aggregate: [sum, avg, max]",
     "datasets.customers.columns.lifetime_value", {"retailer"}),
    ("    abilities: [provide_data, receive_results]", "    abilities: [provide_data, receive_results, run_queries]", "members.retailer.abilities",
     {"retailer", "ad_network"}),
    ("\nidentity:", "\n  agency:\n    abilities: [run_queries, receive_results]\n\nidentity:", "members.agency", {"retailer", "ad_network"}),
    ("schedules:", "difference_checks: {enabled: false}\n\nschedules:", "difference_checks.enabled", {"retailer", "ad_network"}),
]

TIGHTENING = [
    ("    epsilon: 10.0", "    epsilon: 2.0"),
    ("      epsilon_per_query: 1.0", "      epsilon_per_query: 0.5"),
    ("      min_distinct_units: 25\n      join_required: false", "      min_distinct_units: 50\n      join_required: false"),
    ("    period_days: 30", "    period_days: 90"),
    ("schedules:", "ad_hoc: {max_queries_per_day: 20}\n\nschedules:"),
    ("  padding: false", "  padding: true"),
]


@pytest.mark.parametrize(("old", "new", "field", "parties"), LOOSENING, ids=[case[2] for case in LOOSENING])
def test_loosening_a_protection_needs_the_owners_new_approval(demo: Path, old: str, new: str, field: str, parties: set[str]) -> None:
    _edit(demo, old, new)
    issues = [i for i in _issues(demo) if "loosens what" in i]
    assert issues and all(f": {field}" in i for i in issues), issues
    assert {i.split("loosens what ")[1].split(" approved")[0] for i in issues} == parties
    assert all(i.startswith(f"{demo / 'collaboration.yaml'}:") and "dcr policy approve demo --member" in i for i in issues)
    for party in parties:
        approve(demo, party)
    assert _issues(demo) == []


@pytest.mark.parametrize(("old", "new"), TIGHTENING, ids=[case[1].strip() for case in TIGHTENING])
def test_tightening_needs_no_approval(demo: Path, old: str, new: str) -> None:
    _edit(demo, old, new)
    assert not [i for i in _issues(demo) if "approve" in i]  # (a stricter threshold may still make a query inconsistent)


def test_a_query_over_one_partys_table_needs_every_party_whose_identities_feed_the_match(demo: Path) -> None:
    (demo / "queries" / "loyal_counts.sql").write_text("select match_id, loyalty_tier from customers\n")
    (demo / "queries" / "loyal_counts.yaml").write_text(
        "rule: dp\nconsumer: ad_network\nreceivers: [ad_network]\n"
        "dimensions:\n  loyalty_tier: {domain: [bronze, silver, gold]}\nmetrics:\n  people: {aggregate: count_units}\nprivacy: {epsilon: 0.5}\n"
    )
    approve(demo, "retailer")  # the owner of customers alone is not enough
    issues = _issues(demo)
    assert any("'loyal_counts' joins through the cross-reference, which ad_network's identities feed but ad_network has not approved it" in i
               for i in issues), issues
    approve(demo, "ad_network")
    assert load_collaboration(demo).queries["loyal_counts"].sha256 == query_hash(demo / "queries" / "loyal_counts.yaml")


def test_approve_keeps_the_file_as_written_and_refuses_members_without_data(demo: Path) -> None:
    before = (demo / "collaboration.yaml").read_text()
    approve_all(demo)  # nothing changed: the file stays byte for byte
    assert (demo / "collaboration.yaml").read_text() == before
    _edit(demo, "\nidentity:", "\n  agency:\n    abilities: [run_queries, receive_results]\n\nidentity:")
    with pytest.raises(NothingToApprove, match="agency provides no data"):
        approve(demo, "agency")
    with pytest.raises(PolicyError, match="unknown member 'mallory'"):
        approve(demo, "mallory")


def test_a_second_budget_for_one_consumer_is_an_error_naming_both_entries(demo: Path) -> None:
    _edit(demo, "    period_days: 30\n", "    period_days: 30\n  - consumer: ad_network\n    epsilon: 1000.0\n")
    issues = _issues(demo)
    assert any("budgets[1].consumer" in i and "a second budget for ad_network (the first is budgets[0], line " in i for i in issues), issues


def test_moving_a_dataset_to_another_owner_needs_the_previous_owners_approval(demo: Path) -> None:
    """The analyst's party takes over the customers dataset: only the retailer, which owned it, can allow that."""
    _edit(demo, "  customers:\n    owner: retailer", "  customers:\n    owner: ad_network")
    issues = [i for i in _issues(demo) if "loosens what" in i]
    assert any("datasets.customers.owner" in i and "loosens what retailer approved: customers moves from retailer to ad_network" in i
               for i in issues), issues
    approve(demo, "ad_network")
    assert any("loosens what retailer approved" in i for i in _issues(demo))  # the new owner alone is not enough
    approve(demo, "retailer")
    assert not [i for i in _issues(demo) if "loosens" in i]


def test_a_lifetime_budget_is_tighter_than_a_window(demo: Path) -> None:
    _edit(demo, "    period_days: 30\n", "")
    assert not [i for i in _issues(demo) if "approve" in i]
