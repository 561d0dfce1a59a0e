"""Policy parsing: the demo is valid, and every kind of mistake is reported with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcr_pipelines.lib.policy import PolicyError, load_collaboration, query_sha256
from dcr_pipelines.lib.policy.models import IdentifierKind
from dcr_pipelines.lib.settings import PROJECT_ROOT


def test_the_demo_collaboration_is_valid() -> None:
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    assert loaded.parties() == ("retailer", "ad_network")
    assert loaded.matching_client() == "ad_network"
    assert set(loaded.queries) >= {"campaign_reach"}
    purchases = loaded.collaboration.datasets["purchases"]
    assert purchases.columns["customer_email"].identifier == IdentifierKind.EMAIL
    assert "customer_email" not in purchases.shared_columns
    assert loaded.queries["campaign_reach"].datasets == ("impressions", "purchases")


def _edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` once in ``path``; return the 1-based line where the change is."""
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    index = text.index(old)
    path.write_text(text[:index] + new + text[index + len(old) :])
    return text[:index].count("\n") + 1


def _issues(folder: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_collaboration(folder)
    return [str(i) for i in info.value.issues]


COLLAB = "collaboration.yaml"
QUERY_YAML = "queries/campaign_reach.yaml"
QUERY_SQL = "queries/campaign_reach.sql"

MISTAKES = [
    # (file, old text, new text, expected field, expected message part)
    (COLLAB, "  padding: false", "  paddding: false", "matching.paddding", "unknown key"),
    (COLLAB, "epsilon: 10.0", "epsilon: lots", "budgets[0].epsilon", "valid number"),
    (COLLAB, "    owner: retailer", "    owner: retailr", "datasets.purchases.owner", "unknown member 'retailr'"),
    (COLLAB, "shared: [purchase_value, purchase_date, store_region]", "shared: [purchase_value, purchase_day, store_region]", "datasets.purchases.shared[1]", "column 'purchase_day' does not exist"),
    (COLLAB, "{column: purchase_value, op: \">=\"", "{column: purchase_amount, op: \">=\"", "datasets.purchases.row_filters[0].column", "purchase_amount"),
    (COLLAB, "identifier: email, nullable: false, join: true, max_invalid_fraction", "identifier: mail, nullable: false, join: true, max_invalid_fraction", "datasets.purchases.columns.customer_email.identifier", "'mail' is not one of"),
    (COLLAB, "{type: expect_column_mean_to_be_between,", "{type: expect_column_mean_to_be_magic,", "datasets.purchases.expectations[0]", "is not a great-expectations expectation"),
    (COLLAB, "kwargs: {column: purchase_value, min_value: 1,", "kwargs: {column: purchase_total, min_value: 1,", "datasets.purchases.expectations[0]", "column 'purchase_total' does not exist"),
    (COLLAB, "    max_duplicate_fraction: 0.05", "    max_duplicate_fraction: 5", "datasets.purchases.max_duplicate_fraction", "less than or equal to 1"),
    (COLLAB, "name: demo", "name: demo2", "name", "must equal its folder name"),
    (COLLAB, "  - consumer: ad_network", "  - consumer: retailer", "budgets[0].consumer", "lacks the run_queries ability"),
    (COLLAB, "    abilities: [provide_data, receive_results]", "    abilities: [provide_data, recieve_results]", "members.retailer.abilities[1]", "is not one of"),
    (COLLAB, "  overlap_release: exact   #", "  home_parties: [ad_network]\n  overlap_release: exact   #", "matching.home_parties[0]", "cannot be both the matching client and a home party"),
    (COLLAB, "  overlap_release: exact   #", "  home_parties: [ad_netwrk]\n  overlap_release: exact   #", "matching.home_parties[0]", "home party 'ad_netwrk' is not a member"),
    (COLLAB, "  overlap_release: exact   #", "  key_epoch: 7days\n  overlap_release: exact   #", "matching.key_epoch", "'7days' is not a key epoch: use run"),
    (COLLAB, "  overlap_release: exact   #", "  key_epoch: 7\n  overlap_release: exact   #", "matching.key_epoch", "7 is not a key epoch: use run"),
    (COLLAB, "  overlap_release: exact   #", "  key_epoch: 9999d\n  overlap_release: exact   #", "matching.key_epoch", "at most a year"),
    (COLLAB, "  overlap_release: exact   #", "  key_epoch: 7d\n  bucket_steps: true\n  overlap_release: exact   #", "matching.key_epoch", "one matching step (bucket_steps: false)"),
    (COLLAB, "  overlap_release: exact   #", "  overlap_release: withheld   #", "matching.overlap_release", "contradicts the analysis rules: impressions (aggregation rule)"),
    (COLLAB, "  overlap_release: exact   #", "  overlap_release: dp   #", "matching.overlap_release", "let ad_network count the shared people exactly"),
    (COLLAB, 'cron: "0 3 * * *"', 'cron: "99 * * * *"', "schedules[0].cron", "bad minute"),
    (COLLAB, 'cron: "0 3 * * *"', 'cron: "0 3 31 2 *"', "schedules[0].cron", "bad day-of-month"),
    (QUERY_YAML, "consumer: ad_network", "consumer: someone", "consumer", "unknown member 'someone'"),
    (QUERY_YAML, "spend: {aggregate: sum, column: spend, bounds: [0, 300], epsilon_share: 2}", "spend: {aggregate: sum, column: spend, epsilon_share: 2}", "metrics.spend", "needs a 'column' and clamping 'bounds'"),
    (QUERY_YAML, "spend: {aggregate: sum, column: spend,", "spend: {aggregate: sum, column: spent,", "metrics.spend.column", "not an output column"),
]


@pytest.mark.parametrize(("file", "old", "new", "field", "message"), MISTAKES, ids=[m[3] for m in MISTAKES])
def test_a_mistake_is_reported_with_file_line_and_field(policies_copy: Path, file: str, old: str, new: str, field: str, message: str) -> None:
    folder = policies_copy / "demo"
    line = _edit(folder / file, old, new)
    issues = _issues(folder)
    matching = [i for i in issues if f": {field}: " in i]
    assert matching, issues
    assert any(message in i for i in matching), matching
    assert any(i.startswith(f"{folder / file}:{line}:") for i in matching), (line, matching)


def test_a_query_reading_an_unknown_dataset_names_the_sql_line(policies_copy: Path) -> None:
    folder = policies_copy / "demo"
    line = _edit(folder / QUERY_SQL, "from purchases", "from purchase_log")
    issues = _issues(folder)
    assert any(i.startswith(f"{folder / QUERY_SQL}:{line}:") and "unknown dataset 'purchase_log'" in i for i in issues), issues


def test_a_parameter_used_in_sql_but_not_declared_is_an_error(policies_copy: Path) -> None:
    folder = policies_copy / "demo"
    _edit(folder / QUERY_SQL, "purchase_date >= :since", "purchase_date >= :until")
    issues = _issues(folder)
    assert any("parameter :until is not declared" in i for i in issues), issues


def test_invalid_yaml_names_the_line(policies_copy: Path) -> None:
    folder = policies_copy / "demo"
    line = _edit(folder / COLLAB, "  kind: email", "  kind: [email")
    issues = _issues(folder)
    assert len(issues) == 1 and "invalid YAML" in issues[0]
    assert issues[0].startswith(f"{folder / COLLAB}:")
    reported = int(issues[0].split(":")[1])
    assert line <= reported <= line + 2


def test_a_missing_required_key_is_reported(policies_copy: Path) -> None:
    folder = policies_copy / "demo"
    _edit(folder / QUERY_YAML, "receivers: [ad_network, retailer]\n", "")
    issues = _issues(folder)
    assert any(": receivers: required key is missing" in i for i in issues), issues


def test_a_changed_query_is_refused_until_every_owner_reapproves(policies_copy: Path) -> None:
    folder = policies_copy / "demo"
    _edit(folder / QUERY_SQL, "sum(purchase_value) as spend", "sum(purchase_value) * 2 as spend")
    sql_text = (folder / QUERY_SQL).read_text()
    new_hash = query_sha256(sql_text, (folder / QUERY_YAML).read_text())
    issues = _issues(folder)
    for owner in ("retailer", "ad_network"):
        assert any(f"{owner} must re-approve sha256 {new_hash}" in i for i in issues), issues
    # Re-approving with the new hash makes it valid again.
    text = (folder / COLLAB).read_text()
    old_hash = load_hash_from(text)
    (folder / COLLAB).write_text(text.replace(old_hash, new_hash))
    assert load_collaboration(folder).queries["campaign_reach"].sha256 == new_hash


def load_hash_from(text: str) -> str:
    for line in text.splitlines():
        if "sha256:" in line:
            return line.split("sha256:")[1].strip().strip('"')
    raise AssertionError("no approval hash in collaboration.yaml")


BOMB = "bomb:\n  l0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(f"  l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.parametrize(("insert", "message", "line"), [
    (BOMB, "anchors and aliases", 2),  # ten levels of nine: 3.4 billion strings if expanded; lines after `name:`
    ("deep: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep", 1),
    ("pad: '" + "x" * 1_100_000 + "'\n", "larger than 1000 KB", None),
])
def test_a_hostile_yaml_file_is_refused_in_under_a_second_with_its_line(policies_copy: Path, insert: str, message: str, line: int | None) -> None:
    import time

    folder = policies_copy / "demo"
    path = folder / COLLAB
    text = path.read_text()
    line = None if line is None else text[: text.index("name: demo\n")].count("\n") + 1 + line
    path.write_text(text.replace("name: demo\n", "name: demo\n" + insert, 1))
    started = time.perf_counter()
    issues = _issues(folder)
    assert time.perf_counter() - started < 1.0
    assert len(issues) == 1 and message in issues[0], issues
    assert issues[0].startswith(f"{path}:{line}:" if line else f"{path}: "), issues[0]


def test_a_hostile_folder_does_not_stop_the_others(policies_copy: Path) -> None:
    from dcr_pipelines.lib.policy import check_policies

    path = policies_copy / "demo" / COLLAB
    path.write_text(path.read_text().replace("name: demo\n", "name: demo\n" + BOMB, 1))
    loaded, issues = check_policies(policies_copy)
    assert [c.name for c in loaded] == ["demo_home"] and len(issues) == 1 and "aliases" in str(issues[0])


@pytest.mark.parametrize("query", ["campaign_reach", "region_spend", "tier_reach"])
def test_a_column_typo_in_an_approved_query_is_found_by_the_check_with_its_place_and_the_nearest_name(policies_copy: Path, query: str) -> None:
    import random
    import re

    import sqlglot

    path = policies_copy / "demo" / "queries" / f"{query}.sql"
    text = path.read_text()
    columns = [c for c in sqlglot.parse_one(text, read="postgres").find_all(sqlglot.exp.Column)  # a reference, not an output name
               if c.name != "match_id" and not isinstance(c.parent, (sqlglot.exp.Select, sqlglot.exp.Alias))]
    victim = random.Random(query).choice(columns)
    start = int(victim.this.meta["start"])
    typo = victim.name[:-1]
    path.write_text(text[:start] + typo + text[start + len(victim.name):])
    line, column = text.count("\n", 0, start) + 1, start - text.rfind("\n", 0, start)
    issues = _issues(policies_copy / "demo")
    assert any(re.search(rf"{query}\.sql:{line}:{column}: column '{typo}' does not exist .* did you mean '{victim.name}'", i) for i in issues), issues


def test_a_query_without_dimensions_is_refused(policies_copy: Path) -> None:
    path = policies_copy / "demo" / "queries" / "region_spend.yaml"
    text = path.read_text()
    start = text.index("dimensions:")
    end = text.index("metrics:")
    path.write_text(text[:start] + "dimensions: {}\n" + text[end:])
    assert any("at least one dimension" in i for i in _issues(policies_copy / "demo"))


@pytest.mark.parametrize("name", ["raw_spend", "norm_x", "secure_reach", "ids_retailer", "matched_customers", "pre_noise_reach", "bucket_001",
                                  "grants", "cross_reference"])
def test_a_query_named_like_another_lineage_label_is_refused(policies_copy: Path, name: str) -> None:
    """A release is labelled with its query's name; one that reads like another stage's label would look like it."""
    queries = policies_copy / "demo" / "queries"
    for suffix in (".yaml", ".sql"):
        (queries / f"campaign_reach{suffix}").rename(queries / f"{name}{suffix}")
    issue = _issues(policies_copy / "demo")[0]  # then: the approval of campaign_reach names a query that is gone
    assert f"{name}.yaml" in issue and "looks like another asset in the lineage graph" in issue and "rename the files" in issue
