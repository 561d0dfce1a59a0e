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
from pathlib import Path


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


# Dagster asset keys: [collab, stage, label]. The lineage graph shows a node by its label alone and, past about
# sixteen characters, cuts the middle out of it. So the label starts with what tells nodes apart, the stage, then the
# dataset, party or query it is about, and carries no party name (a dataset has one owner; the key's tags name it):
#   raw/raw_customers  ->  private/norm_customers  ->  staging/secure_customers  ->  analysis/matched_customers
#   private/ids_retailer (a party's identities)       analysis/pre_noise_tier_reach  ->  results/tier_reach (the release)
# Two datasets whose names share their first eight characters still look alike there; docs/architecture.md says so.

RAW_LABEL, NORMALISED_LABEL, SECURE_LABEL, IDENTITIES_LABEL = "raw_", "norm_", "secure_", "ids_"
BUCKET_LABEL, MATCHED_LABEL, PRE_NOISE_LABEL = "bucket_", "matched_", "pre_noise_"
STAGE_LABELS = (RAW_LABEL, NORMALISED_LABEL, SECURE_LABEL, IDENTITIES_LABEL, BUCKET_LABEL, MATCHED_LABEL, PRE_NOISE_LABEL)
OTHER_LABELS = ("grants", "cross_reference")  # a release is labelled with its query's name: none of these may be one


def grants_key(collab: str) -> list[str]:
    return [collab, "access", "grants"]


def raw_key(collab: str, dataset: str) -> list[str]:
    return [collab, "raw", f"{RAW_LABEL}{dataset}"]


def staging_key(collab: str, dataset: str) -> list[str]:
    return [collab, "staging", f"{SECURE_LABEL}{dataset}"]


def normalised_key(collab: str, dataset: str) -> list[str]:
    return [collab, "private", f"{NORMALISED_LABEL}{dataset}"]


def identities_key(collab: str, party: str) -> list[str]:
    return [collab, "private", f"{IDENTITIES_LABEL}{party}"]


def bucket_key(collab: str, bucket: int) -> list[str]:
    return [collab, "matching", f"{BUCKET_LABEL}{bucket:03d}"]


def cross_reference_key(collab: str) -> list[str]:
    return [collab, "matching", "cross_reference"]


def matched_key(collab: str, dataset: str, overlap: str = "") -> list[str]:
    return [collab, "analysis", f"{MATCHED_LABEL}{dataset}{overlap}"]


def analysis_key(collab: str, query: str) -> list[str]:
    return [collab, "analysis", f"{PRE_NOISE_LABEL}{query}"]


def release_key(collab: str, query: str) -> list[str]:
    return [collab, "results", query]


def ad_hoc_key(collab: str) -> list[str]:
    return [collab, "results", "ad_hoc"]


# Dagster job names: every run of a collaboration goes through one of its jobs (runner.job_for).


def job_names(collab: str) -> dict[str, str]:
    return {"pipeline": f"{collab}__all", "releases": f"{collab}__releases", "ad_hoc": f"{collab}__ad_hoc"}


def uploads_job_name(collab: str, party: str, dataset: str) -> str:
    return f"{collab}__{party}__{dataset}__uploads"


# The landing folder: <landing>/<collab>/<party>/<dataset>/ per dataset, and a home party's PSI messages beside them.

PSI_FOLDER = "_psi"


def landing_folder(landing: Path, collab: str, party: str, dataset: str) -> Path:
    return landing / collab / party / dataset
