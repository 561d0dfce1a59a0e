"""Names of schemas, dbt models and Dagster asset keys, derived from the policy.

One collaboration owns these PostgreSQL schemas (``demo`` shown):

- ``demo_raw_<party>``     uploads, normalised identifiers (party-private)
- ``demo_staging_<party>`` secure tables: shared columns and keyed tokens only
- ``demo_matching``        the cross-reference table (match_id <-> tokens)
- ``demo_analysis``        matched views and pre-noise aggregates (never the analyst's)
- ``demo_results``         released values, budget ledger, release cache
"""

from __future__ import annotations

from collections.abc import Sequence


def raw_schema(collab: str, party: str) -> str:
    return f"{collab}_raw_{party}"


def staging_schema(collab: str, party: str) -> str:
    return f"{collab}_staging_{party}"


def matching_schema(collab: str) -> str:
    return f"{collab}_matching"


def analysis_schema(collab: str) -> str:
    return f"{collab}_analysis"


def results_schema(collab: str) -> str:
    return f"{collab}_results"


def normalised_model(collab: str, party: str, dataset: str) -> str:
    return f"int_{collab}__{party}__{dataset}"


def staging_model(collab: str, party: str, dataset: str) -> str:
    return f"stg_{collab}__{party}__{dataset}"


def identities_model(collab: str, party: str) -> str:
    return f"idn_{collab}__{party}"


def matched_model(collab: str, dataset: str, overlap: str = "") -> str:
    return f"mv_{collab}__{dataset}{overlap}"


def overlap_suffix(subset: Sequence[str], parties: Sequence[str]) -> str:
    """How the tables and views of the people shared by ``subset`` are told apart: nothing for every party,
    ``__<party>__<party>`` (declaration order) for some of them."""
    return "" if tuple(subset) == tuple(parties) else "".join(f"__{p}" for p in subset)


def cross_reference_table(overlap: str = "") -> str:
    """The matching schema's table of match_ids of the people shared by one set of parties (``overlap_suffix``)."""
    return f"cross_reference{overlap}"


def links_table(overlap: str = "") -> str:
    """Several identifiers: every token of a matched person (match_id, party, token), what the matched views join on."""
    return f"cross_reference{overlap}__links"


def query_model(collab: str, query: str) -> str:
    return f"qry_{collab}__{query}"


def token_column(column: str) -> str:
    return f"{column}_token"


def party_token_column(party: str) -> str:
    return f"{party}_token"


# Dagster asset keys: [collab, stage, name]. The UI labels a node with its last part only, so
# that part is unique within a collaboration and says what the asset is:
#   raw/retailer__customers__uploads  ->  private/retailer__customers__normalised  ->  staging/retailer__customers__secure
#   analysis/tier_reach__pre_noise    ->  results/tier_reach (the release)


def grants_key(collab: str) -> list[str]:
    return [collab, "access", "grants"]


def raw_key(collab: str, party: str, dataset: str) -> list[str]:
    return [collab, "raw", f"{party}__{dataset}__uploads"]


def staging_key(collab: str, party: str, dataset: str) -> list[str]:
    return [collab, "staging", f"{party}__{dataset}__secure"]


def normalised_key(collab: str, party: str, dataset: str) -> list[str]:
    return [collab, "private", f"{party}__{dataset}__normalised"]


def identities_key(collab: str, party: str) -> list[str]:
    return [collab, "private", f"{party}__identities"]


def bucket_key(collab: str, bucket: int) -> list[str]:
    return [collab, "matching", f"bucket_{bucket:03d}"]


def cross_reference_key(collab: str) -> list[str]:
    return [collab, "matching", "cross_reference"]


def matched_key(collab: str, dataset: str, overlap: str = "") -> list[str]:
    return [collab, "analysis", f"matched_{dataset}{overlap}"]


PRE_NOISE_SUFFIX = "__pre_noise"


def analysis_key(collab: str, query: str) -> list[str]:
    return [collab, "analysis", f"{query}{PRE_NOISE_SUFFIX}"]


def release_key(collab: str, query: str) -> list[str]:
    return [collab, "results", query]


def ad_hoc_key(collab: str) -> list[str]:
    return [collab, "results", "ad_hoc"]


# Dagster job names: every run of a collaboration goes through one of its jobs (runner.job_for).


def job_names(collab: str) -> dict[str, str]:
    return {"pipeline": f"{collab}__all", "releases": f"{collab}__releases", "ad_hoc": f"{collab}__ad_hoc"}


def uploads_job_name(collab: str, party: str, dataset: str) -> str:
    return f"{collab}__{party}__{dataset}__uploads"
