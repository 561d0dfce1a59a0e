"""What a party's audit export may carry: its own entries, ad-hoc runs over its data, and no count the policy withholds."""

from __future__ import annotations

import dataclasses

from dcr_pipelines.defs.audit import redact, touches
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

MATCHING = {"asset": "demo/matching/cross_reference", "metadata": {
    "matched": 3000, "cross_reference_rows": 3000, "input_rows_retailer": 5000, "input_rows_ad_network": 5000, "bytes_exchanged": 10**6, "buckets": 2}}


def _with_overlap(mode: str):  # type: ignore[no-untyped-def]
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    matching = loaded.collaboration.matching.model_copy(update={"overlap_release": mode})
    return dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(update={"matching": matching}))


def test_a_party_never_sees_another_partys_row_count_or_the_exchange_size() -> None:
    seen = redact(_with_overlap("exact"), MATCHING, "ad_network")["metadata"]
    assert seen == {"matched": 3000, "cross_reference_rows": 3000, "input_rows_ad_network": 5000, "buckets": 2}


def test_the_exact_overlap_reaches_a_party_only_where_the_policy_releases_it() -> None:
    for mode in ("withheld", "dp"):
        seen = redact(_with_overlap(mode), MATCHING, "retailer")["metadata"]
        assert "matched" not in seen and "cross_reference_rows" not in seen and seen["input_rows_retailer"] == 5000


def test_ad_hoc_runs_concern_the_runner_and_the_owners_of_the_datasets_they_name() -> None:
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    over_customers = {"runner": "ad_network", "datasets": "impressions, customers"}
    own_only = {"runner": "ad_network", "datasets": "impressions"}
    assert touches(loaded, "demo/results/ad_hoc", "retailer", over_customers)
    assert touches(loaded, "demo/results/ad_hoc", "ad_network", own_only)
    assert not touches(loaded, "demo/results/ad_hoc", "retailer", own_only)
    refused = {"message": "query refused: ...", "runner": "ad_network", "datasets": "customers"}
    assert touches(loaded, "demo/results/ad_hoc", "retailer", refused)
