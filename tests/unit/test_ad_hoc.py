"""Ad-hoc SQL against the analysis rules: a table of accepted and refused queries.

The collaboration is the demo plus a publisher with a list-rule dataset, a
custom-rule dataset, and two members without the abilities to query. Each
refused query asserts the rule its refusal names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlglot

from dcr_pipelines.lib import ad_hoc
from dcr_pipelines.lib.policy import load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.settings import PROJECT_ROOT

from ..policy_edits import exact_customers

EXTRA_MEMBERS = """
  publisher:
    abilities: [provide_data]
  auditor:
    abilities: [receive_results]
  intern:
    abilities: [run_queries]
"""

EXTRA_DATASETS = """
  subscribers:
    owner: publisher
    columns:
      email: {type: text, identifier: email, nullable: false, join: true}
      newsletter: {type: text, nullable: false, list: true}
      country: {type: text, nullable: false, list: true}
      signup_date: {type: date, nullable: false, dimension: true}
    analysis_rule: {type: list, join_operators: [and, or], scalar_functions: [lower]}

  notes:
    owner: publisher
    columns:
      email: {type: text, identifier: email, nullable: false, join: true}
      segment: {type: text, nullable: false, dimension: true}
    analysis_rule: {type: custom}
"""

JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("policies") / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    text = (folder / "collaboration.yaml").read_text()
    text = exact_customers(text).replace("\nidentity:", EXTRA_MEMBERS + "\nidentity:", 1).replace("\nbudgets:", EXTRA_DATASETS + "\nbudgets:", 1)
    (folder / "collaboration.yaml").write_text(text)
    approve_all(folder)
    return load_collaboration(folder)


ACCEPTED = [
    f"select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers {JOIN} group by i.campaign_id, c.loyalty_tier",
    f"select c.loyalty_tier, count(*) {JOIN} group by c.loyalty_tier",
    f"select c.loyalty_tier, sum(c.lifetime_value), avg(c.lifetime_value) {JOIN} group by 1",
    f"select c.age_band, round(avg(c.lifetime_value), 2) as avg_value {JOIN} group by c.age_band order by avg_value desc limit 3",
    f"select count(distinct c.customer_email) {JOIN}",
    f"select c.loyalty_tier as tier, count(*) as n {JOIN} group by tier order by n",
    f"select upper(c.loyalty_tier), count(*) {JOIN} group by upper(c.loyalty_tier)",
    f"select date_trunc('month', i.impression_time) as month, count(distinct i.user_email) {JOIN} group by 1 order by 1",
    f"select extract(month from i.impression_time) as m, count(*) {JOIN} group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band in ('18-24', '25-34') group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band = '55+' or c.loyalty_tier = 'gold' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time >= '2026-03-01' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where not (c.age_band between '18-24' and '35-44') group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band like '1%' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} group by 1 having count(*) > 10",
    f"select c.loyalty_tier, sum(c.lifetime_value) / 100 as hundreds {JOIN} group by 1",
    f"select coalesce(c.loyalty_tier, 'none'), count(*) {JOIN} group by 1",
    "select campaign_id, count(*) from impressions group by campaign_id",
    "SELECT CAMPAIGN_ID, COUNT(*) FROM IMPRESSIONS GROUP BY CAMPAIGN_ID",
    "select i.campaign_id, count(distinct i.user_email) from impressions i group by i.campaign_id order by 2 desc",
    f"select c.loyalty_tier, count(*) {JOIN} group by 1 limit 2 offset 1",
    "select distinct s.newsletter, s.country from subscribers as s inner join impressions as i on i.user_email = s.email",
    "select distinct s.newsletter from subscribers s join impressions i on i.user_email = s.email where s.country = 'nl'",
    "select distinct lower(s.newsletter) from subscribers s join impressions i on i.user_email = s.email",
    "select distinct s.newsletter from subscribers s join impressions i on i.user_email = s.email where s.signup_date >= '2026-01-01'",
    "select i.campaign_id, count(*) from impressions i join customers c on i.user_email = c.customer_email and c.customer_email = i.user_email group by 1",
]

# Two-phase forms: the analyst's arithmetic over aggregates (evaluated only for groups that passed the threshold),
# total functions before the threshold, and names resolved as PostgreSQL resolves them.
ACCEPTED += [
    f"select c.loyalty_tier, sum(c.lifetime_value) * 1e300 {JOIN} group by 1",
    f"select c.loyalty_tier, (sum(c.lifetime_value) - 123456.78) * 1e131071 * 1000 {JOIN} group by 1",
    f"select c.loyalty_tier, count(*) * 9223372036854775807 {JOIN} group by 1",
    f"select c.loyalty_tier, count(*) + 9223372036854775807 as n {JOIN} group by 1",
    f"select c.loyalty_tier, round(avg(c.lifetime_value) / 0.000001, 2) {JOIN} group by 1",
    f"select c.loyalty_tier, sum(c.lifetime_value) / 1e-300 {JOIN} group by 1",
    f"select c.loyalty_tier, coalesce(sum(c.lifetime_value), 0) * 2 {JOIN} group by 1",
    f"select c.loyalty_tier, round(round(sum(c.lifetime_value), 2) * 3 + count(*) / 7, 1) {JOIN} group by 1",
    f"select c.loyalty_tier, sum(c.lifetime_value) - avg(c.lifetime_value) * count(*) {JOIN} group by 1",
    f"select upper(c.loyalty_tier), lower(c.age_band), count(*) {JOIN} group by c.loyalty_tier, c.age_band",
    f"select c.loyalty_tier, count(*) {JOIN} group by 1 having sum(c.lifetime_value) * 1e300 > 0",
    f"select c.loyalty_tier, count(*) {JOIN} group by 1 having count(*) * 9223372036854775807 > 0",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band = '55+' and i.impression_time < '2099-01-01' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band in ('18-24') or not (i.campaign_id like 'zz%') group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time between '2026-01-01' and '2026-12-31 23:59:59' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.campaign_id is not null group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where lower(i.campaign_id) = 'spring_sale' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where upper(c.age_band) like '5%' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where coalesce(c.age_band, '?') <> '?' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where extract(year from i.impression_time) = 2026 group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where extract(dow from i.impression_time) in (0, 6) group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where date_trunc('month', i.impression_time) = '2026-03-01' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time >= timestamp '2026-03-01' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band between c.loyalty_tier and 'z' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where coalesce(c.age_band, c.loyalty_tier) = '55+' group by 1",
    f"select round(extract(epoch from i.impression_time), -5), count(*) {JOIN} group by 1",
    f"select c.loyalty_tier, round(sum(c.lifetime_value) / count(*), 2) as mean {JOIN} group by 1 order by mean desc",
    f"select c.loyalty_tier, upper(c.loyalty_tier), count(*) {JOIN} group by 1",
    f"select c.loyalty_tier, count(*) / (count(*) - 3) {JOIN} group by 1",  # after the threshold: fails only on released groups
    f"select c.loyalty_tier, sum(c.lifetime_value) % count(*) {JOIN} group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time >= cast('2026-03-01' as timestamp) group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where i.campaign_id like 'spring\\_%' group by 1",
    f"select c.loyalty_tier, count(*) {JOIN} where c.age_band > '1' group by 1",
    f"select date_trunc('quarter', i.impression_time), count(*) {JOIN} group by 1",
    f"select extract(isoyear from i.impression_time), extract(epoch from i.impression_time), count(*) {JOIN} group by 1, 2",
    f"select round(avg(c.lifetime_value), 2), round(sum(c.lifetime_value), -3) {JOIN}",
    f"select c.loyalty_tier as tier, c.age_band as band, count(*) {JOIN} group by tier, band",
    f"select c.loyalty_tier as loyalty_tier, count(*) {JOIN} group by loyalty_tier",
    f"select c.loyalty_tier, count(*) as n {JOIN} group by 1 order by n desc, 1 limit 10",
    f"select c.loyalty_tier, count(*) {JOIN} group by c.loyalty_tier order by c.loyalty_tier",
    "select count(*) from impressions as i where i.campaign_id = 'zz_rare'",
    "select i.campaign_id, count(*) * 4611686018427387904 from impressions as i group by 1",
    "select i.campaign_id, count(distinct i.user_email) + 0.5 from impressions i group by 1 having count(distinct i.user_email) > 30",
    "select lower(i.campaign_id), date_trunc('year', i.impression_time), count(*) from impressions i group by 1, 2",
    "select i.campaign_id, count(*) from impressions i where i.impression_time < '2026-03-01' or i.impression_time >= '2026-06-01' group by 1",
    "select distinct s.newsletter, lower(s.country) from subscribers s join impressions i on i.user_email = s.email where s.country in ('nl', 'be')",
    "select distinct s.newsletter from subscribers s join impressions i on i.user_email = s.email where i.impression_time >= '2026-01-01' and s.signup_date < '2026-06-01'",
]

REFUSED = [
    # (runner, sql, the rule the refusal must name)
    ("ad_network", "select * from impressions", "select *"),
    ("ad_network", f"select c.* {JOIN}", "select *"),
    ("ad_network", "select campaign_id from impressions", "aggregation rule"),
    ("ad_network", "select campaign_id, count(*) from impressions group by campaign_id; drop table impressions", "single SELECT"),
    ("ad_network", "delete from impressions", "single SELECT"),
    ("ad_network", "update impressions set campaign_id = 'x'", "single SELECT"),
    ("ad_network", "set role postgres", "single SELECT"),
    ("ad_network", "select campaign_id, count(*) from impressions -- a comment\n group by 1", "query text"),
    ("ad_network", "select campaign_id, /* hidden */ count(*) from impressions group by 1", "query text"),
    ("ad_network", "select campaign_id, count(*) from impressions\u200b group by 1", "query text"),
    ("ad_network", "select campaign_id,\u00a0count(*) from impressions group by 1", "query text"),
    ("ad_network", "select campaign_id, count(* from impressions", "syntax"),
    ("ad_network", "select relname, count(*) from pg_class group by 1", "system catalogs"),
    ("ad_network", "select table_name, count(*) from information_schema.tables group by 1", "system catalogs"),
    ("ad_network", "select count(*) from pg_catalog.pg_roles", "system catalogs"),
    ("ad_network", "select current_setting('dcr.hmac_retailer_inner'), count(*) from impressions group by 1", "settings"),
    ("ad_network", "select campaign_id, count(*) from impressions where pg_sleep(10) is null group by 1", "settings"),
    ("ad_network", "select version(), count(*) from impressions group by 1", "settings"),
    ("ad_network", "select count(*) from demo_analysis.matched_customers", "tables"),
    ("ad_network", "select count(*) from secrets", "tables"),
    ("ad_network", "select campaign_id, count(*) from impressions group by 1 union select 'x', 1", "set operations"),
    ("ad_network", "select campaign_id, count(*) from impressions group by 1 union all select campaign_id, count(*) from impressions group by 1", "set operations"),
    ("ad_network", "select campaign_id, count(*) from impressions group by 1 except select campaign_id, count(*) from impressions group by 1", "set operations"),
    ("ad_network", "with t as (select user_email from impressions) select count(*) from t", "subqueries"),
    ("ad_network", "select campaign_id, count(*) from (select * from impressions) as x group by 1", "subqueries"),
    ("ad_network", "select campaign_id, (select count(*) from customers) from impressions group by 1", "subqueries"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.loyalty_tier in (select loyalty_tier from customers) group by 1", "subqueries"),
    ("ad_network", "select campaign_id, count(*) over (partition by campaign_id) from impressions", "window functions"),
    ("ad_network", "select campaign_id, row_number() over () from impressions", "window functions"),
    ("ad_network", f"select c.loyalty_tier, sum(count(*)) over () {JOIN} group by 1", "window functions"),
    ("ad_network", f"select c.customer_email, count(*) {JOIN} group by 1", "join columns"),
    ("ad_network", "select user_email, count(*) from impressions group by 1", "join columns"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.customer_email = 'ana.1@example.com' group by 1", "join columns"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where lower(i.user_email) like 'ana%' group by 1", "join columns"),
    ("ad_network", f"select c.loyalty_tier, count(c.customer_email) {JOIN} group by 1", "join columns"),
    ("ad_network", f"select c.lifetime_value, count(*) {JOIN} group by 1", "dimension columns"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.lifetime_value > 5000 group by 1", "dimension columns"),
    ("ad_network", f"select c.loyalty_tier, max(c.lifetime_value) {JOIN} group by 1", "aggregate columns"),
    ("ad_network", f"select c.loyalty_tier, min(c.lifetime_value) {JOIN} group by 1", "aggregate columns"),
    ("ad_network", f"select c.loyalty_tier, count(c.age_band) {JOIN} group by 1", "aggregate columns"),
    ("ad_network", f"select c.loyalty_tier, sum(distinct c.lifetime_value) {JOIN} group by 1", "aggregate columns"),
    ("ad_network", f"select c.loyalty_tier, c.age_band, count(*) {JOIN} group by 1", "dimension columns"),
    ("ad_network", f"select c.lifetime_value as tier, count(*) {JOIN} group by tier", "dimension columns"),
    ("ad_network", "select c.loyalty_tier, count(*) from customers as c group by 1", "join_required"),
    ("ad_network", "select count(*) from customers", "join_required"),
    ("ad_network", "select distinct s.newsletter from subscribers s", "join_required"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i left join customers c on c.customer_email = i.user_email group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i full outer join customers c on c.customer_email = i.user_email group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i cross join customers c group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i, customers c where c.customer_email = i.user_email group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i join customers c on c.loyalty_tier = i.campaign_id group by 1", "join columns"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i join customers c on c.customer_email <> i.user_email group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i join customers c on true group by 1", "joins"),
    ("ad_network", "select c.loyalty_tier, count(*) from impressions i join customers c on c.customer_email = i.user_email or c.customer_email = i.user_email group by 1", "join_operators"),
    ("ad_network", f"select case when c.age_band = '55+' then 'old' else 'young' end, count(*) {JOIN} group by 1", "scalar_functions"),
    ("ad_network", f"select length(c.loyalty_tier), count(*) {JOIN} group by 1", "scalar_functions"),
    ("ad_network", f"select md5(c.loyalty_tier), count(*) {JOIN} group by 1", "scalar functions"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band = $1 group by 1", "parameters"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1 order by c.age_band", "order by"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1 limit (1 + 1)", "limit"),
    ("ad_network", "select campaign_id, count(*) as dcr_units from impressions group by 1", "columns"),
    ("ad_network", "select nope, count(*) from impressions group by 1", "columns"),
    ("ad_network", f"select loyalty_tier, count(*) {JOIN} join subscribers s on s.email = i.user_email group by 1", "list rule"),
    ("ad_network", "select s.newsletter, count(*) from subscribers s join impressions i on i.user_email = s.email group by 1", "list rule"),
    ("ad_network", "select distinct s.signup_date from subscribers s join impressions i on i.user_email = s.email", "list columns"),
    ("ad_network", "select distinct i.campaign_id, s.newsletter from subscribers s join impressions i on i.user_email = s.email", "list columns"),
    ("ad_network", "select distinct s.email from subscribers s join impressions i on i.user_email = s.email", "join columns"),
    ("ad_network", "select distinct i.campaign_id from impressions i join customers c on c.customer_email = i.user_email", "aggregation rule"),
    ("ad_network", "select store_region, count(*) from purchases group by 1", "dp rule"),
    ("ad_network", "select n.segment, count(*) from notes n join impressions i on i.user_email = n.email group by 1", "custom rule"),
    ("retailer", f"select c.loyalty_tier, count(*) {JOIN} group by 1", "member abilities"),
    ("auditor", f"select c.loyalty_tier, count(*) {JOIN} group by 1", "member abilities"),
    ("intern", f"select c.loyalty_tier, count(*) {JOIN} group by 1", "member abilities"),
    ("mallory", f"select c.loyalty_tier, count(*) {JOIN} group by 1", "members"),
    # Arithmetic and failing functions before the threshold: the error oracle (pre-threshold evaluation).
    ("ad_network", f"select c.loyalty_tier, sum((c.lifetime_value - 1000) * 1e300) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(c.lifetime_value * 2) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(c.lifetime_value + 9223372036854775807) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(c.lifetime_value / 0.5) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(c.lifetime_value % 7) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, avg(-c.lifetime_value) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(round(c.lifetime_value, 2) * 1e300) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(round(c.lifetime_value, 99999)) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(coalesce(c.lifetime_value, 1e300 * 10)) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.lifetime_value * 1e300 > 0 group by 1", "dimension columns"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where extract(year from i.impression_time) * 1e131071 > 0 group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time + interval '1000000 years' > '2026-01-01' group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time - interval '1 day' > '2026-01-01' group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where -extract(year from i.impression_time) < 0 group by 1", "pre-threshold"),
    ("ad_network", f"select extract(year from i.impression_time) + 1, count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select date_trunc('fortnight', i.impression_time), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select extract(timezone from i.impression_time), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select extract(year from c.age_band), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select date_trunc('month', c.age_band), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band like 'x\\' group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band like c.loyalty_tier group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band = i.impression_time group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time = 2026 group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band in (c.loyalty_tier) group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time >= date '2026-03-01' group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band is distinct from 'x' group by 1", "syntax"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where c.age_band group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where case c.age_band when '55+' then true else false end group by 1", "scalar_functions"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where count(*) > 1 group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, sum(count(*)) {JOIN} group by 1", "aggregation rule"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1, 'x'", "syntax"),
    ("ad_network", f"select count(*), c.loyalty_tier {JOIN} group by 1", "aggregation rule"),
    ("ad_network", f"select c.loyalty_tier as n, count(*) as n2 {JOIN} group by n2", "aggregation rule"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 3", "syntax"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1 order by 5", "order by"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1 limit 'x'", "limit"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1 offset (2)", "limit"),
    # Names that mean one thing to the checker and another to PostgreSQL (ambiguous names).
    ("ad_network", "select i.campaign_id as match_id, count(*) from impressions as i group by match_id, i.campaign_id", "ambiguous names"),
    ("ad_network", "select i.campaign_id as dcr_unit, count(*) from impressions as i group by dcr_unit", "columns"),
    ("ad_network", "select upper(i.campaign_id) as campaign_id, count(*) from impressions as i group by campaign_id", "ambiguous names"),
    ("ad_network", "select date_trunc('month', i.impression_time) as impression_time, count(*) from impressions as i group by impression_time", "ambiguous names"),
    ("ad_network", f"select c.age_band as loyalty_tier, count(*) {JOIN} group by loyalty_tier", "ambiguous names"),
    ("ad_network", f"select c.age_band as loyalty_tier, count(*) {JOIN} group by 1 order by loyalty_tier", "ambiguous names"),
    ("ad_network", f"select c.age_band as user_email, count(*) {JOIN} group by user_email", "ambiguous names"),
    ("ad_network", f"select c.loyalty_tier, count(*) as n {JOIN} group by 1 having n > 3", "ambiguous names"),
    ("ad_network", "select i.campaign_id, count(*) from impressions as i where match_id is not null group by 1", "columns"),
    ("ad_network", "select i.campaign_id, count(distinct i.match_id) from impressions as i group by 1", "columns"),
    ("ad_network", "select i.campaign_id, count(*) from impressions as i group by 1 order by match_id", "order by"),
    ("ad_network", "select i.campaign_id, count(*) from impressions as i group by i.match_id", "columns"),
    ("ad_network", f"select loyalty_tier, count(*) {JOIN} group by 1 order by dcr_units", "order by"),
    ("ad_network", f"select c.loyalty_tier, count(*) as dcr_people {JOIN} group by 1", "columns"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where i.impression_time >= '2026-01-01'::date group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where extract(year from i.impression_time) in (2026, i.campaign_id) group by 1", "pre-threshold"),
    ("ad_network", f"select c.loyalty_tier, count(*) {JOIN} where coalesce(i.impression_time, 5) > '2026-01-01' group by 1", "pre-threshold"),
    ("ad_network", f"select round(extract(epoch from i.impression_time), 1e10), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", f"select round(extract(epoch from i.impression_time), extract(year from i.impression_time)), count(*) {JOIN} group by 1", "pre-threshold"),
    ("ad_network", "select i.campaign_id, count(*) from impressions as i where 1 / 0 = 1 group by 1", "arithmetic"),
    ("ad_network", "select extract(year from i.impression_time) / (extract(month from i.impression_time) - 3), count(*) from impressions as i group by 1", "arithmetic"),
    # Casts before the threshold: only conversions defined for every value.
    ("ad_network", "select cast(i.campaign_id as bigint), count(*) from impressions as i group by 1", "scalar_functions"),
]


@pytest.mark.parametrize("sql_text", ACCEPTED)
def test_accepted(loaded, sql_text: str) -> None:  # type: ignore[no-untyped-def]
    checked = ad_hoc.check(loaded, "ad_network", sql_text)
    assert checked.columns
    physical = sqlglot.parse_one(checked.phase1, read="postgres")
    # Only matched views are read, and every group is thresholded on distinct people before anything else.
    assert {t.name for t in physical.find_all(sqlglot.exp.Table)} <= {f"matched_{d}" for d in loaded.collaboration.datasets}
    having = physical.args["having"].this
    assert isinstance(having, sqlglot.exp.GTE) and having.expression.this == str(checked.min_distinct_units)
    assert "email" not in checked.phase1
    # Phase 2 reads nothing but the surviving groups.
    later = sqlglot.parse_one(checked.phase2(["bigint"] + ["text"] * (len(checked.input_names) - 1)).replace("%s", "null"), read="postgres")
    assert not list(later.find_all(sqlglot.exp.Table))


@pytest.mark.parametrize(("runner", "sql_text", "rule"), REFUSED, ids=[f"{i:02d}" for i in range(len(REFUSED))])
def test_refused(loaded, runner: str, sql_text: str, rule: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ad_hoc.QueryRefused) as caught:
        ad_hoc.check(loaded, runner, sql_text)
    assert rule in caught.value.rule, f"{sql_text!r} refused under {caught.value.rule!r}: {caught.value}"


def test_the_table_covers_every_class_of_refusal() -> None:
    rules = {rule for _, _, rule in REFUSED}
    assert {"pre-threshold", "ambiguous names", "join columns", "subqueries", "system catalogs", "scalar_functions", "arithmetic"} <= rules
    assert len(ACCEPTED) + len(REFUSED) >= 200


def test_most_restrictive_settings_win(loaded) -> None:  # type: ignore[no-untyped-def]
    alone = ad_hoc.check(loaded, "ad_network", "select campaign_id, count(*) from impressions group by 1")
    assert alone.min_distinct_units == 25
    # date_trunc is allowed on both; lower is allowed on subscribers and impressions but a list query
    # cannot mix rules, so the intersection is visible on the join operators: OR is allowed by
    # subscribers but not by impressions.
    with pytest.raises(ad_hoc.QueryRefused, match="OR is not an allowed join operator"):
        ad_hoc.check(loaded, "ad_network", "select distinct s.newsletter from subscribers s join impressions i on i.user_email = s.email or s.email = i.user_email")


def test_refusal_names_the_offending_part(loaded) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ad_hoc.QueryRefused) as caught:
        ad_hoc.check(loaded, "ad_network", "select loyalty_tier, count(*) from customers group by 1")
    assert str(caught.value) == "table customers requires an inner join with a table of the query runner (ad_network) (aggregation rule, join_required)"
    with pytest.raises(ad_hoc.QueryRefused, match=r"customers\.lifetime_value"):
        ad_hoc.check(loaded, "ad_network", f"select c.loyalty_tier, max(c.lifetime_value) {JOIN} group by 1")


def test_rewrite_ignores_what_the_analyst_typed_around_the_query(loaded) -> None:  # type: ignore[no-untyped-def]
    a = ad_hoc.check(loaded, "ad_network", f"select c.loyalty_tier, count(*) {JOIN} group by 1")
    b = ad_hoc.check(loaded, "ad_network", f"SELECT   c.loyalty_tier ,\n\tCOUNT(*)\n{JOIN.upper()}\nGROUP BY 1")
    assert a.sql == b.sql


def test_policy_rejects_unknown_scalar_function(tmp_path: Path) -> None:
    from dcr_pipelines.lib.policy import PolicyError

    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    path = folder / "collaboration.yaml"
    path.write_text(path.read_text().replace("scalar_functions: [date_trunc, extract, lower, upper, round, coalesce]", "scalar_functions: [lowr]", 1))
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    issue = caught.value.issues[0]
    assert issue.line is not None and "analysis_rule.scalar_functions" in issue.field and "lowr" in issue.message


def test_policy_rejects_threshold_query_on_a_dp_dataset(tmp_path: Path) -> None:
    from dcr_pipelines.lib.policy import PolicyError

    folder = tmp_path / "demo"
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    spec = folder / "queries" / "region_spend.yaml"
    text = spec.read_text().replace("rule: dp", "rule: threshold\nmin_distinct_units: 25").replace("privacy:\n  epsilon: 0.5\n", "")
    spec.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_collaboration(folder)
    assert any("allows only differentially private releases" in i.message and i.file == spec for i in caught.value.issues)
