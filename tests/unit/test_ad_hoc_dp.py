"""Ad-hoc SQL under the differential_privacy rule, the pure part: what a query is planned as, what its noise costs,
and what a release of noised groups looks like. (Runs against PostgreSQL: tests/integration/test_ad_hoc_generated_attacks.py.)"""

from __future__ import annotations

import math
import shutil

import pytest

from dcr_pipelines.lib import ad_hoc
from dcr_pipelines.lib.ad_hoc.checker import POST_FUNCTIONS, sql_name
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.privacy import ad_hoc as ad_hoc_noise
from dcr_pipelines.lib.privacy.contribution import DpAggregate, DpQuery
from dcr_pipelines.lib.settings import PROJECT_ROOT

from ..policy_edits import threshold_tier_reach

JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    return load_collaboration(PROJECT_ROOT / "policies" / "demo")


def test_a_query_over_a_dp_dataset_is_planned_with_noise_and_its_cost(demo) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(demo, "ad_network", f"select c.loyalty_tier, count(distinct c.customer_email) as n, avg(c.lifetime_value) as v {JOIN} group by 1")
    assert checked.mode == "dp" and checked.dp is not None
    dp = checked.dp
    assert dp.epsilon == 1.0 and dp.domains == (("bronze", "silver", "gold"),) and not dp.key_selection
    assert dp.max_groups == 1  # the only key is a column of customers, one row per customer (unique identifier)
    assert [a.function for a in dp.aggregates] == ["count_people", "avg"] and dp.aggregates[1].upper == 2000.0
    assert dp.min_people == 25  # impressions' exact threshold applies to the noised count of people
    assert any("costs epsilon 1 of ad_network's budget" in line for line in checked.summary())


def test_a_key_without_a_public_domain_is_released_by_key_selection_and_costs_delta(demo) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(demo, "ad_network", f"select i.campaign_id, sum(c.lifetime_value) as v {JOIN} group by 1")
    assert checked.dp is not None and checked.dp.key_selection and checked.dp.max_groups == 6
    noise = ad_hoc_noise.plan(checked.dp)
    assert noise.selection is not None and noise.delta > 0 and noise.delta <= checked.dp.key_selection_delta
    assert noise.selection.threshold >= 25  # never below the exact threshold of a dataset read alongside
    assert noise.epsilon <= checked.dp.epsilon + 1e-12


def test_the_runners_own_exact_table_alone_stays_exact(demo) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(demo, "ad_network", "select campaign_id, count(*) from impressions group by 1")
    assert checked.mode == "exact" and checked.dp is None


@pytest.mark.parametrize(("sql_text", "why"), [
    (f"select c.loyalty_tier, min(c.lifetime_value) {JOIN} group by 1", "aggregate"),
    (f"select c.loyalty_tier, count(distinct c.age_band) {JOIN} group by 1", "differential_privacy rule, aggregate columns"),
    (f"select c.loyalty_tier, sum(distinct c.lifetime_value) {JOIN} group by 1", "DISTINCT"),
    ("select distinct c.loyalty_tier from customers as c inner join impressions as i on i.user_email = c.customer_email", "differential_privacy rule"),
    ("select loyalty_tier, count(*) from customers group by 1", "join_required"),
    (f"select c.loyalty_tier, count(*) {JOIN} inner join impressions as j on j.user_email = i.user_email group by 1", "read twice"),
    ("select i.campaign_id, count(*) from impressions as i inner join impressions as j on j.user_email = i.user_email group by 1", "self-join"),
])
def test_what_noise_cannot_bound_is_refused(demo, sql_text: str, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ad_hoc.QueryRefused) as caught:
        ad_hoc.check(demo, "ad_network", sql_text)
    assert why in str(caught.value)


def test_a_sum_needs_bounds_and_the_policy_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dcr_pipelines.lib.policy import PolicyError

    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "collaboration.yaml"
    text = path.read_text().replace("      bounds: {lifetime_value: [0, 2000]}", "      bounds: {}")
    path.write_text(text.replace("aggregate: [sum, avg], range: [0, 1000000]}", "aggregate: [sum, avg]}"))
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    assert any("needs bounds" in i.message and "analysis_rule.bounds" in i.field for i in caught.value.issues)


@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("rows", [1, 4])
def test_each_vector_is_calibrated_to_what_one_person_can_add(groups: int, rows: int) -> None:
    query = DpQuery(epsilon=1.0, key_selection_delta=1e-6, max_groups=groups, max_rows=rows,
                    aggregates=(DpAggregate("count_rows", "count(*)", 0, rows), DpAggregate("count_people", "count(distinct x)", 0, 1),
                                DpAggregate("sum", "sum(v)", -50, 300), DpAggregate("avg", "avg(v)", 0, 300)),
                    domains=(("a", "b"),))
    noise = ad_hoc_noise.plan(query)
    sensitivity = {p.column: p.sensitivity for p in noise.plans}
    assert sensitivity == {"a1": groups * rows, "a2": groups, "a3": groups * 300, "a4__sum": groups * 300, "a4__n": groups}
    assert noise.selection is None and noise.delta == 0
    assert math.isclose(sum(p.epsilon for p in noise.plans), noise.epsilon) and noise.epsilon <= 1.0 + 1e-12
    shares = {p.column: p.epsilon_target for p in noise.plans}
    assert shares["a1"] == shares["a2"] == shares["a3"] == pytest.approx(0.25) and shares["a4__sum"] == pytest.approx(0.125)


def test_a_public_domain_releases_every_group_even_empty_ones() -> None:
    query = DpQuery(epsilon=1.0, key_selection_delta=1e-6, max_groups=1, max_rows=1,
                    aggregates=(DpAggregate("count_people", "n", 0, 1),), domains=(("x", "y", "z"),))
    released = ad_hoc_noise.release(ad_hoc_noise.plan(query), query, ["k1", "dcr_units", "a1"], [("x", 40, 40)], keys=1)
    assert [g.keys for g in released] == [("x",), ("y",), ("z",)]
    assert all(isinstance(g.values[0], int) and g.intervals[0] is not None for g in released)
    low, high = released[0].intervals[0]  # type: ignore[misc]
    assert low <= released[0].values[0] <= high  # type: ignore[operator]


def test_key_selection_drops_a_group_of_one_and_keeps_a_large_one() -> None:
    query = DpQuery(epsilon=1.0, key_selection_delta=1e-6, max_groups=1, max_rows=1,
                    aggregates=(DpAggregate("count_people", "n", 0, 1),), domains=None)
    noise = ad_hoc_noise.plan(query)
    kept = set()
    for _ in range(200):
        released = ad_hoc_noise.release(noise, query, ["k1", "dcr_units", "a1"], [("rare", 1, 1), ("common", 5000, 5000)], keys=1)
        kept |= {g.keys[0] for g in released}
    assert kept == {"common"}


def test_a_noised_count_under_the_exact_threshold_drops_its_group() -> None:
    query = DpQuery(epsilon=1.0, key_selection_delta=1e-6, max_groups=1, max_rows=1,
                    aggregates=(DpAggregate("sum", "s", 0, 10),), domains=(("few", "many"),), min_people=25)
    noise = ad_hoc_noise.plan(query)
    assert noise.people == "dcr_units" and len(noise.plans) == 2  # a count of people is noised to apply the threshold
    seen = set()
    for _ in range(50):
        seen |= {g.keys[0] for g in ad_hoc_noise.release(noise, query, ["k1", "dcr_units", "a1"], [("few", 2, 20), ("many", 500, 4000)], keys=1)}
    assert seen == {"many"}


@pytest.mark.parametrize("function", ["sqrt(sum(c.lifetime_value))", "ln(count(*))", "log(count(*))", "trunc(avg(c.lifetime_value), 1)",
                                      "to_char(count(*), '999')", "cast(count(*) as numeric)", "abs(sum(c.lifetime_value) - 10)"])
def test_functions_of_released_aggregates_need_no_allow_list(demo, function: str) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(demo, "ad_network", f"select c.loyalty_tier, {function} as x {JOIN} group by 1")
    assert checked.columns == ("loyalty_tier", "x")


@pytest.mark.parametrize("node", sorted(POST_FUNCTIONS, key=lambda t: t.__name__), ids=lambda t: t.__name__)
def test_a_refusal_names_the_function_as_written_never_an_internal_name(demo, node: type) -> None:  # type: ignore[no-untyped-def]
    name = POST_FUNCTIONS[node]
    args = {"to_char": "i.campaign_id, 'x'", "extract": "year from i.impression_time", "cast": "i.campaign_id as text",
            "trunc": "c.lifetime_value", "log": "c.lifetime_value"}.get(name, "c.lifetime_value")
    sql_text = f"select {name}({args}) as x, count(*) {JOIN} where c.loyalty_tier = 'gold' group by 1"
    try:
        ad_hoc.check(demo, "ad_network", sql_text)
    except ad_hoc.QueryRefused as exc:
        assert node.__name__ not in str(exc) and "time_to_str" not in str(exc).lower(), str(exc)
    assert sql_name(__import__("sqlglot").parse_one(f"select {name}({args})", read="postgres").expressions[0]) in (name, "cast")


def test_the_demo_scaffold_is_dp_by_default(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dcr_pipelines.lib.policy.scaffold import create

    folder = create(tmp_path, "trial", ["shop", "media"])
    loaded = load_collaboration(folder)
    assert {ds.analysis_rule.type for ds in loaded.collaboration.datasets.values()} == {"differential_privacy"}
    checked = ad_hoc.check(loaded, "shop", "select m.segment, count(distinct m.email) from shop_records s join media_records m on m.email = s.email group by 1")
    assert checked.mode == "dp"


def test_an_approved_threshold_query_may_not_read_a_dp_dataset(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its parameters and the runner's own uploads would make it a tracker (an outside attack read a value exactly)."""
    from dcr_pipelines.lib.policy import PolicyError

    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    threshold_tier_reach(folder)
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    assert any("(differential_privacy) allows only differentially private releases; set 'rule: dp'" in i.message for i in caught.value.issues)
