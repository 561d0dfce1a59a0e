"""What a party's audit export may carry: its own entries, ad-hoc runs over its data, and no count the policy withholds."""

from __future__ import annotations

import dataclasses

from dcr_pipelines.defs.audit import redact, touches
from dcr_pipelines.lib import naming
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.settings import PROJECT_ROOT

MATCHING = {"asset": "demo/matching/cross_reference", "metadata": {
    "matched": 3000, "cross_reference_rows": 3000, "input_rows_retailer": 5000, "input_rows_ad_network": 5000, "bytes_exchanged": 10**6, "buckets": 2,
    # a new key epoch blinds every party's identities: their sum less one's own would be the other's count
    "identities_blinded": 10000, "scalar_multiplications": 20000, "work_buckets": 2}}


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


GRAPH_MATCHING = {"asset": "three_parties/matching/cross_reference", "metadata": {
    "matched": 50, "matched_all": 50, "matched__bank__telecom": 310, "linked_telecom_bank_phone": 300, "linked_bank_airline_email": 120,
    "input_records_bank": 700, "input_records_telecom": 490, "input_records_airline": 480, "psi_jobs": 8, "bytes_exchanged": 10**5,
    "identity_rule": "any_of"}}


def test_the_overlaps_of_some_parties_and_per_kind_links_reach_no_party() -> None:
    """Several identifiers and party subsets: whatever overlap_release says, a party sees its own record count only."""
    loaded = load_collaboration(PROJECT_ROOT / "examples" / "three_parties")
    for mode in ("exact", "withheld", "dp"):
        matching = loaded.collaboration.matching.model_copy(update={"overlap_release": mode})
        policy = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(update={"matching": matching}))
        for party in ("bank", "telecom", "airline"):
            seen = redact(policy, GRAPH_MATCHING, party)["metadata"]
            overlap = {"matched": 50, "matched_all": 50} if mode == "exact" else {}
            assert seen == {**overlap, f"input_records_{party}": GRAPH_MATCHING["metadata"][f"input_records_{party}"], "identity_rule": "any_of"}


def test_ad_hoc_runs_concern_the_runner_and_the_owners_of_the_datasets_they_name() -> None:
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    over_customers = {"runner": "ad_network", "datasets": "impressions, customers"}
    own_only = {"runner": "ad_network", "datasets": "impressions"}
    assert touches(loaded, "demo/results/ad_hoc", "retailer", over_customers)
    assert touches(loaded, "demo/results/ad_hoc", "ad_network", own_only)
    assert not touches(loaded, "demo/results/ad_hoc", "retailer", own_only)
    refused = {"message": "query refused: ...", "runner": "ad_network", "datasets": "customers"}
    assert touches(loaded, "demo/results/ad_hoc", "retailer", refused)


def test_a_party_private_asset_concerns_its_owner_alone_under_the_current_keys_and_the_older_ones() -> None:
    """The labels carry no party name; the owner comes from the policy. Entries kept under the older
    ``<party>__<dataset>__<stage>`` keys are still filtered by the party they name."""
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    for name, ds in loaded.collaboration.datasets.items():
        for key in (naming.raw_key("demo", name), naming.normalised_key("demo", name), naming.staging_key("demo", name)):
            assert {p for p in loaded.parties() if touches(loaded, "/".join(key), p)} == {ds.owner}, key
        for stage, suffix in (("raw", "uploads"), ("private", "normalised"), ("staging", "secure")):
            older = f"demo/{stage}/{ds.owner}__{name}__{suffix}"
            assert {p for p in loaded.parties() if touches(loaded, older, p)} == {ds.owner}, older
    for party in loaded.parties():
        assert {p for p in loaded.parties() if touches(loaded, "/".join(naming.identities_key("demo", party)), p)} == {party}
    tier = "/".join(naming.analysis_key("demo", "tier_reach"))
    assert {p for p in loaded.parties() if touches(loaded, tier, p)} == {p for p in loaded.parties() if touches(loaded, "demo/analysis/pre_noise_tier_reach", p)}


def test_the_party_recorded_on_an_entry_decides_over_the_current_policy() -> None:
    """A dataset name that changed hands: the entry made when the ad network owned it stays the ad network's."""
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    for key in (naming.raw_key("demo", "purchases"), naming.normalised_key("demo", "purchases"), naming.staging_key("demo", "purchases"),
                naming.identities_key("demo", "retailer")):
        assert {p for p in loaded.parties() if touches(loaded, "/".join(key), p, {"party": "ad_network"})} == {"ad_network"}, key
        assert {p for p in loaded.parties() if touches(loaded, "/".join(key), p, {"row_count": 5})} == {"retailer"}, key


def test_the_parties_recorded_on_an_analysis_release_or_ad_hoc_entry_decide_over_the_current_policy() -> None:
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    for asset in ("demo/results/ad_hoc", "demo/results/campaign_reach", "demo/analysis/pre_noise_campaign_reach", "demo/analysis/matched_customers"):
        assert {p for p in loaded.parties() if touches(loaded, asset, p, {"concerns": "ad_network"})} == {"ad_network"}, asset
        assert {p for p in loaded.parties() if touches(loaded, asset, p, {"concerns": "ad_network, retailer"})} == {"ad_network", "retailer"}
    # without a record (older entries), the current policy decides: customers are the retailer's
    assert {p for p in loaded.parties() if touches(loaded, "demo/analysis/matched_customers", p, {})} == {"retailer"}
