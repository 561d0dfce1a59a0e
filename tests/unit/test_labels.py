"""Asset labels (the last part of a key, all the lineage graph shows) tell the assets of a collaboration apart
within the 16 characters Dagster keeps before it cuts the middle out, for any names that differ within their first
six characters: generated names, every stage."""

from __future__ import annotations

import random
import string

from dcr_pipelines.lib import naming

SHOWN = 16


def _names(rng: random.Random, n: int, prefix_taken: set[str]) -> list[str]:
    """``n`` policy-valid names (NAME_PATTERN) of 1 to 40 characters whose first six characters differ."""
    out: list[str] = []
    while len(out) < n:
        name = rng.choice(string.ascii_lowercase) + "".join(rng.choice(string.ascii_lowercase + string.digits + "_") for _ in range(rng.randint(0, 39)))
        if name[:6] in prefix_taken or name in naming.OTHER_LABELS or name.startswith(naming.STAGE_LABELS):
            continue  # the policy refuses a query named like another label (test_policy)
        prefix_taken.add(name[:6])
        out.append(name)
    return out


def _labels(collab: str, parties: list[str], datasets: list[str], queries: list[str]) -> list[str]:
    keys = [naming.grants_key(collab), naming.cross_reference_key(collab), naming.ad_hoc_key(collab)]
    keys += [naming.bucket_key(collab, b) for b in range(3)]
    keys += [naming.identities_key(collab, p) for p in parties]
    for d in datasets:
        keys += [naming.raw_key(collab, d), naming.normalised_key(collab, d), naming.staging_key(collab, d), naming.matched_key(collab, d)]
    for q in queries:
        keys += [naming.analysis_key(collab, q), naming.release_key(collab, q)]
    return [k[-1] for k in keys]


def test_generated_collaborations_have_labels_that_differ_within_what_the_graph_shows() -> None:
    rng = random.Random(33)
    for _ in range(500):
        taken: set[str] = set()
        parties = _names(rng, rng.randint(2, 4), set())
        datasets = _names(rng, rng.randint(1, 6), taken)
        queries = _names(rng, rng.randint(1, 6), taken)
        labels = _labels("c", parties, datasets, queries)
        shown = [label[:SHOWN] for label in labels]
        assert len(set(shown)) == len(shown), sorted(labels)


def test_the_older_keys_failed_this_for_one_partys_datasets() -> None:
    """The check above can fail: the keys before this naming put the party first, and two datasets of one party
    (or one dataset at three stages) shared their first 16 characters."""
    older = [f"retailer__{d}__{stage}" for d in ("customers", "purchases") for stage in ("uploads", "normalised", "secure")]
    assert len({label[:SHOWN] for label in older}) < len(older)
