"""Generated attacks on ad-hoc SQL in both modes: random targets, random guesses, hundreds of noisy trials.

Two collaborations differ in one person, Tess: ``gen_b`` holds her as a retailer customer (gold, lifetime
value 2,000, the top of the DP bounds), ``gen_a`` does not. The ad network's file is the same in both: its
impressions plus two injected rows for Tess and for each of 16 random emails (customers of the retailer or
not, the attacker does not know). ``customers`` is under the demo's differential_privacy rule;
``customers_exact``, the same file, under the exact aggregation rule (threshold 25).

Exact mode: every attack class the analysts ran is generated over random targets. Each either learns
nothing (its two answers are equal, or its outcome is the same for every target and guess), or it is a class
docs/threat-model.md lists as remaining, with the number of queries it took here. Each is also run with the
defence off (the plain SQL, as the operator) to show that the test can fail.

DP mode: each attack runs 200 times in each world with fresh noise, and the attacker's best guess (present or
absent) is scored: the empirical privacy loss, ln(TPR / FPR) with exact binomial confidence bounds (a
DP-Auditorium-style audit), stays within the epsilon the attack spent, while the same guess on the pre-noise
values is always right.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pytest
from scipy.stats import beta

from dcr_pipelines.definitions import build_definitions, secret_names
from dcr_pipelines.lib import ad_hoc, demo_data, naming
from dcr_pipelines.lib.policy import LoadedCollaboration, load_collaboration
from dcr_pipelines.lib.policy.approve import approve_all
from dcr_pipelines.lib.runtime import ensure_development_secrets
from dcr_pipelines.lib.settings import PROJECT_ROOT
from dcr_pipelines.runner import analysis_run_config, collaboration_keys, materialize
from dcr_pipelines.services import ad_hoc as ad_hoc_service

from .conftest import land
from .test_ad_hoc import forget_history

A, B = "gen_a", "gen_b"
TESS = "tess.target@example.org"
TESS_ROWS = [(TESS, "zz_target", "2099-01-01T10:00:00"), (TESS, "zz_target", "2099-01-02T10:00:00")]
TESS_VALUE = 2000.0
WHALE, WHALE_VALUE = "whale@example.org", 50000.0
INJECTED = 16
EXACT_JOIN = "from impressions as i inner join customers_exact as c on c.customer_email = i.user_email"
DP_JOIN = "from impressions as i inner join customers as c on c.customer_email = i.user_email"
TRIALS = 200
EPSILON = 1.0  # the demo's epsilon_per_query
THREAT_MODEL = PROJECT_ROOT / "docs" / "threat-model.md"

EXACT_COPY = """
  customers_exact:
    owner: retailer
    description: The customers file again, under the exact (thresholded) aggregation rule.
    columns:
      customer_email: {type: text, identifier: email, nullable: false, unique: true, join: true}
      loyalty_tier: {type: text, nullable: false, dimension: true, allowed_values: [bronze, silver, gold]}
      age_band: {type: text, nullable: false, dimension: true}
      lifetime_value: {type: numeric, nullable: false, aggregate: [sum, avg], range: [0, 1000000]}
    analysis_rule: {type: aggregation, min_distinct_units: 25, join_required: true, scalar_functions: [round], join_operators: [and]}
"""


def staged_now(conn: Any, loaded: Any) -> Any:
    """What the staged data were built from, as Dagster's event log records it (the gate's input)."""
    import dagster as dg

    from dcr_pipelines.defs import freshness

    return freshness.staged(dg.DagsterInstance.get(), conn, loaded)



def _policy(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(PROJECT_ROOT / "policies" / "demo", folder)
    shutil.rmtree(folder / "queries")
    path = folder / "collaboration.yaml"
    text = path.read_text().replace("    mode: append", "    mode: replace").replace("name: demo", f"name: {name}")
    text = text.split("\napprovals:\n")[0] + "\nschedules: []\n"
    text = text.replace("\nbudgets:", EXACT_COPY + "\nbudgets:", 1).replace("    epsilon: 10.0", "    epsilon: 1000000.0")
    path.write_text(text)
    approve_all(folder)
    return folder


@pytest.fixture(scope="module")
def worlds(runtime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("generated_attack_policies")
    loaded = {name: load_collaboration(_policy(root, name)) for name in (A, B)}
    settings = dataclasses.replace(runtime.settings, policies=root)
    ensure_development_secrets(settings.home, secret_names(settings))
    files = demo_data.generate(settings.home / "generated" / "gen_attacks", rows=1_600, overlap=0.5, seed=41)
    assert files.customers is not None
    rng = random.Random(4141)
    customers = pd.read_csv(files.customers)
    impressions = pd.read_csv(files.impressions)
    users = set(impressions["user_email"].str.strip().str.lower())
    customer_emails = sorted(set(customers["customer_email"].str.strip().str.lower()) - users)
    strangers = [f"stranger{n}@example.net" for n in range(INJECTED // 2)]
    injected = rng.sample(customer_emails, INJECTED // 2) + strangers  # the attacker cannot tell which are customers
    extra = [*TESS_ROWS, *((WHALE, "spring_sale", f"2026-02-0{d}T12:00:00") for d in (1, 2, 3))]
    for n, email in enumerate(injected):
        extra += [(email, "zz_injected", f"2098-{1 + n // 28:02d}-{1 + n % 28:02d}T0{k}:00:00") for k in (1, 2)]
    for name in (A, B):
        land(files, settings.landing, name)
        with (settings.landing / name / "ad_network" / "impressions" / files.impressions.name).open("a") as handle:
            handle.writelines(",".join(row) + "\n" for row in extra)
        folder = settings.landing / name / "retailer"
        with (folder / "customers" / files.customers.name).open("a") as handle:
            handle.write(f"{WHALE},bronze,35-44,{WHALE_VALUE}\n")  # in both worlds: a value far above the DP bounds
        shutil.copytree(folder / "customers", folder / "customers_exact")
        if name == B:
            for dataset in ("customers", "customers_exact"):
                with (folder / dataset / files.customers.name).open("a") as handle:
                    handle.write(f"{TESS},gold,55+,{TESS_VALUE}\n")
    defs = build_definitions(settings)
    for name in (A, B):
        outcome = materialize(defs, collaboration_keys(defs, name, releases=True), instance=dg.DagsterInstance.get(), run_config=analysis_run_config(name, {}))
        assert outcome.success, outcome.failure
    impressions = pd.concat([impressions, pd.DataFrame(extra, columns=["user_email", "campaign_id", "impression_time"])])
    impressions["email"] = impressions["user_email"].str.strip().str.lower()
    customers = pd.concat([customers, pd.DataFrame([(WHALE, "bronze", "35-44", WHALE_VALUE), (TESS, "gold", "55+", TESS_VALUE)],
                                                   columns=list(customers.columns))])
    customers["email"] = customers["customer_email"].str.strip().str.lower()
    return {"loaded": loaded, "url": runtime.warehouse.url(), "impressions": impressions, "customers": customers, "injected": injected}


_runs = itertools.count()


def ask(worlds: dict[str, Any], text: str, world: str = B) -> tuple[str, Any]:
    """What the analyst gets: ("rows", result) or ("refused", the one-line message)."""
    loaded: LoadedCollaboration = worlds["loaded"][world]
    try:
        checked = ad_hoc.check(loaded, "ad_network", text)
        with psycopg.connect(worlds["url"], autocommit=True) as conn:
            return ("rows", ad_hoc_service.execute(conn, loaded, checked, f"generated-{world}-{next(_runs)}", text, staged_now(conn, loaded)))
    except ad_hoc.QueryRefused as exc:
        return ("refused", str(exc))


def operator(worlds: dict[str, Any], statement: str, world: str = B) -> tuple[str, Any]:
    """The same question with the defence off: the plain SQL on the matched views, as the operator."""
    with psycopg.connect(worlds["url"], autocommit=True) as conn:
        try:
            return ("rows", conn.execute(statement.replace("{a}", naming.analysis_schema(world))).fetchall())  # type: ignore[arg-type]
        except psycopg.Error as exc:
            return ("error", exc.sqlstate)


def times_of(worlds: dict[str, Any], email: str) -> list[str]:
    frame = worlds["impressions"]
    return sorted(frame[frame["email"] == email]["impression_time"])


def in_list(values: list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def shared(worlds: dict[str, Any]) -> pd.DataFrame:
    """Shared people (customers who saw an ad), with their number of impressions, as the plain files say."""
    seen = worlds["impressions"].groupby("email").size().rename("impressions").reset_index()
    return worlds["customers"].merge(seen, on="email")


def documented(phrase: str) -> str:
    """The threat model's paragraph that names an attack class (the test fails if the documentation drops it)."""
    text = THREAT_MODEL.read_text()
    assert phrase in text, f"docs/threat-model.md no longer documents {phrase!r}"
    return text.split(phrase, 1)[1].split("\n\n", 1)[0]


# --- exact mode ------------------------------------------------------------------------------

BY_TIER = f"select c.loyalty_tier, count(*) as n, sum(c.lifetime_value) as v, avg(c.lifetime_value) as a {EXACT_JOIN} {{where}} group by 1"
NAIVE_BY_TIER = ('select c.loyalty_tier, sum(c.lifetime_value) from "{{a}}".matched_impressions i join "{{a}}".matched_customers_exact c '
                 "on c.match_id = i.match_id {where} group by 1 order by 1")


def test_row_multiplicity_and_injected_rows_move_no_exact_answer(worlds: dict[str, Any]) -> None:
    """Two queries that differ by one of the target's own rows, for random shared people and for random injected
    emails: per person first, the answers are equal; with row-level aggregates they differ by the target's value."""
    rng = random.Random(2801)
    people = shared(worlds)
    several = people[people["impressions"] >= 2]
    targets = list(several.sample(8, random_state=rng.randrange(10**6))["email"]) + rng.sample(worlds["injected"], 8)
    leaked = 0
    for email in targets:
        row = random.Random(email).choice(times_of(worlds, email))
        forget_history(worlds["url"], B)
        kind1, first = ask(worlds, BY_TIER.format(where=""))
        kind2, second = ask(worlds, BY_TIER.format(where=f"where i.impression_time <> '{row}'"))
        assert kind1 == kind2 == "rows" and second.suppressed == 0
        assert second.rows == first.rows, f"one row of {email} moved an exact answer"
        _, naive1 = operator(worlds, NAIVE_BY_TIER.format(where=""))
        _, naive2 = operator(worlds, NAIVE_BY_TIER.format(where=f"where i.impression_time <> '{row}'"))
        customer = people[people["email"] == email]
        if len(customer):
            moved = {t: float(x) - float(y) for (t, x), (_, y) in zip(naive1, naive2, strict=True) if x != y}
            assert moved == {customer.iloc[0]["loyalty_tier"]: pytest.approx(float(customer.iloc[0]["lifetime_value"]))}
            leaked += 1
    assert leaked >= 8, "with row-level aggregates the pair must give away each customer's tier and value"


def test_the_phase_two_error_oracle_gets_the_same_answer_for_every_guess(worlds: dict[str, Any]) -> None:
    """The binary search on `having count(*) / round(sum(v) / 2X) < 0` over a group that differs from a released one by
    the target: every group is checked and recorded before phase 2, so the run is withheld whatever X; without the
    defence the error appears exactly when the group's sum is below X. Withheld runs count against the daily cap."""
    rng = random.Random(2802)
    people = shared(worlds)
    for _, target in people.sample(4, random_state=rng.randrange(10**6)).iterrows():
        away = f"where i.impression_time not in ({in_list(times_of(worlds, target['email']))})"
        tier = target["loyalty_tier"]
        rest = people[(people["loyalty_tier"] == tier) & (people["email"] != target["email"])]["lifetime_value"].sum()
        guesses = [rest * f for f in (0.5, 0.999, 1.001, 2.0)] + [rng.uniform(0, 2 * rest) for _ in range(3)]
        forget_history(worlds["url"], B)
        assert ask(worlds, BY_TIER.format(where=""))[0] == "rows"
        outcomes = set()
        for x in guesses:
            text = (f"select c.loyalty_tier, count(*) as n {EXACT_JOIN} {away} group by 1 "
                    f"having count(*) / round(sum(c.lifetime_value) / {2 * x:.6f}) < 0")
            kind, result = ask(worlds, text)
            assert kind == "rows"
            outcomes.add((tuple(map(str, result.rows)), result.suppressed))
        assert outcomes == {((), 3)}, f"the oracle's answer depends on the guess: {outcomes}"
        # Defence off: the same HAVING over the group as the old phase 2 saw it (each customer once), unrecorded.
        group = (f'from "{{a}}".matched_customers_exact c where c.loyalty_tier = \'{tier}\' and exists (select 1 from "{{a}}".matched_impressions i '
                 f"where i.match_id = c.match_id and i.impression_time not in ({in_list(times_of(worlds, target['email']))}))")
        naive = [operator(worlds, f"select count(*) {group} having count(*) / round(sum(c.lifetime_value) / {2 * x:.6f}) < 0")[0] for x in guesses]
        assert naive[0] == "rows" and naive[1] == "rows" and naive[2] == "error" and naive[3] == "error"
    with psycopg.connect(worlds["url"]) as conn:
        assert ad_hoc_service.runs_today(conn, B, "ad_network") >= 4 * 8  # withheld runs are counted like any other


def test_which_row_was_withheld_no_longer_tells_a_tier_and_membership_is_the_documented_signal(worlds: dict[str, Any]) -> None:
    """Grouping by the other party's tiers, a pair that differs by one target: the whole second result is withheld,
    so its outcome is the same whatever the target's tier. Whether it is withheld still says whether the target is a
    customer (two queries): the class the threat model lists as remaining in exact mode."""
    rng = random.Random(2803)
    people = shared(worlds)
    targets = [people[people["loyalty_tier"] == t].sample(2, random_state=rng.randrange(10**6))["email"].tolist() for t in ("bronze", "silver", "gold")]
    outcomes = set()
    for email in itertools.chain(*targets):
        forget_history(worlds["url"], B)
        ask(worlds, BY_TIER.format(where=""))
        kind, result = ask(worlds, BY_TIER.format(where=f"where i.impression_time not in ({in_list(times_of(worlds, email))})"))
        assert kind == "rows"
        outcomes.add((tuple(map(str, result.rows)), result.suppressed))
    assert outcomes == {((), 3)}, "the outcome must not depend on the target's tier"
    correct = 0
    customers = set(worlds["customers"]["email"])
    for email in worlds["injected"]:
        forget_history(worlds["url"], B)
        ask(worlds, BY_TIER.format(where=""))
        _, result = ask(worlds, BY_TIER.format(where=f"where i.impression_time not in ({in_list(times_of(worlds, email))})"))
        correct += (result.suppressed > 0) == (email in customers)
    assert correct == len(worlds["injected"])  # membership, one bit per pair of queries
    assert "2 queries" in documented("*The withholding itself is a signal.*")


def test_a_three_query_tracker_still_isolates_a_value_in_exact_mode_as_documented(worlds: dict[str, Any]) -> None:
    """S - K - (S minus K minus {t}): every pair of the three differs by at least the threshold, so nothing is withheld,
    and the target's value is their difference. Only noise stops trackers: the threat model says so, with the count."""
    rng = random.Random(2804)
    people = shared(worlds)
    for _, target in people.sample(3, random_state=rng.randrange(10**6)).iterrows():
        others = people[people["email"] != target["email"]].sample(40, random_state=rng.randrange(10**6))["email"]
        k_times = [t for e in others for t in times_of(worlds, e)]
        t_times = times_of(worlds, target["email"])
        forget_history(worlds["url"], B)
        total = f"select sum(c.lifetime_value) as v {EXACT_JOIN}"
        answers = [ask(worlds, q) for q in (total, f"{total} where i.impression_time in ({in_list(k_times)})",
                                             f"{total} where i.impression_time not in ({in_list(k_times + t_times)})")]
        assert all(kind == "rows" and r.suppressed == 0 and len(r.rows) == 1 for kind, r in answers)
        s, k, rest = (float(r.rows[0]["v"]) for _, r in answers)
        assert s - k - rest == pytest.approx(float(target["lifetime_value"]))
    assert "3 queries" in documented("*Trackers.*")


# --- differential privacy ----------------------------------------------------------------------

COVER = "i.campaign_id in ('zz_target', 'spring_sale')"  # Tess's rows and a campaign that clears the threshold of 25 (impressions' rule)
ATTACKS = {
    # name: (a query over the DP customers table, the attacker's guess "Tess is a customer" from its rows and what it
    # knows exactly: every other person's data, i.e. the pre-noise answer without her)
    "presence_count": (f"select count(distinct c.customer_email) as n {DP_JOIN} where {COVER} and {{k}} = {{k}}",
                       lambda rows, known: bool(rows) and rows[0]["n"] >= known["a1"] + 0.5),
    "value_sum": (f"select sum(c.lifetime_value) as v {DP_JOIN} where {COVER} and {{k}} = {{k}}",
                  lambda rows, known: bool(rows) and rows[0]["v"] >= known["a1"] + TESS_VALUE / 2),
    "row_multiplicity": (f"select count(*) as n {DP_JOIN} where {COVER} and {{k}} = {{k}}",
                         lambda rows, known: bool(rows) and rows[0]["n"] >= known["a1"] + 0.5),
    "which_group": (f"select c.loyalty_tier, count(*) as n {DP_JOIN} where i.impression_time >= '2000-01-01' and {{k}} = {{k}} group by 1",
                    lambda rows, known: any(r["loyalty_tier"] == "gold" and r["n"] >= known[("gold", "a1")] + 0.5 for r in rows)),
    "phase_two_oracle": (f"select sum(c.lifetime_value) as v {DP_JOIN} where {COVER} and {{k}} = {{k}} "
                         f"having sum(c.lifetime_value) > {{threshold}}",
                         lambda rows, known: bool(rows)),
}


def pre_noise(worlds: dict[str, Any], text: str, world: str) -> dict[Any, float]:
    """Phase 1 of a DP query as the operator sees it: each group's bounded sums before any noise ("a1", or (key, "a1"))."""
    checked = ad_hoc.check(worlds["loaded"][world], "ad_network", text)
    with psycopg.connect(worlds["url"], autocommit=True) as conn:
        cursor = conn.execute(checked.phase1)  # type: ignore[arg-type]
        names = [d.name for d in cursor.description or ()]
        out: dict[Any, float] = {}
        for row in cursor.fetchall():
            for name, value in zip(names[checked.keys:], row[checked.keys:], strict=True):
                out[(*row[: checked.keys], name) if checked.keys else name] = float(value or 0)
    return out


def _epsilon_lower_bound(hits: int, false_alarms: int, trials: int, confidence: float = 0.99) -> float:
    """The privacy loss the guesses prove at this confidence (exact Clopper-Pearson bounds on both rates)."""
    alpha = 1 - confidence
    tpr_low = beta.ppf(alpha / 2, hits, trials - hits + 1) if hits else 0.0
    fpr_high = beta.ppf(1 - alpha / 2, false_alarms + 1, trials - false_alarms) if false_alarms < trials else 1.0
    tnr_low = beta.ppf(alpha / 2, trials - false_alarms, false_alarms + 1) if false_alarms < trials else 0.0
    fnr_high = beta.ppf(1 - alpha / 2, trials - hits + 1, hits) if hits else 1.0
    bounds = [math.log(tpr_low / fpr_high) if tpr_low > 0 else 0.0, math.log(tnr_low / fnr_high) if tnr_low > 0 else 0.0]
    return max(0.0, *bounds)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_dp_attack_loses_no_more_privacy_than_its_epsilon(worlds: dict[str, Any], attack: str) -> None:
    template, guess = ATTACKS[attack]
    known = pre_noise(worlds, template.format(k=0, threshold=0), A)  # the strongest attacker: everyone but Tess, exactly
    truth = pre_noise(worlds, template.format(k=0, threshold=0), B)
    threshold = known.get("a1", 0.0) + TESS_VALUE / 2
    said_present = {A: 0, B: 0}
    spent = set()
    for world in (A, B):
        for k in range(TRIALS):
            kind, result = ask(worlds, template.format(k=k + 1, threshold=threshold), world)
            assert kind == "rows", result
            assert not result.cached and result.mode == "dp"
            spent.add(round(result.epsilon, 9))
            said_present[world] += guess(result.rows, known)
    assert spent and max(spent) <= EPSILON + 1e-9
    measured = _epsilon_lower_bound(said_present[B], said_present[A], TRIALS)
    print(f"{attack}: said 'present' {said_present[B]}/{TRIALS} with Tess, {said_present[A]}/{TRIALS} without; proven loss {measured:.3f} <= {EPSILON}")
    assert measured <= EPSILON, f"{attack}: the guesses prove a privacy loss of {measured:.3f} > epsilon {EPSILON}"
    # The audit has power: Tess moves the pre-noise answer, so without noise the same guess is always right, and with
    # noise it still does better than chance (the bound above is not met by guessing blindly).
    assert truth != known and {k: truth[k] - known[k] for k in known if truth[k] != known[k]}
    assert said_present[B] > said_present[A], f"{attack}: the guess must do better than chance, or the audit proves nothing"
    assert "200 times" in documented("Tested in DP mode")


def test_the_audit_would_catch_a_mechanism_that_spends_more_than_it_says() -> None:
    """The bound is not vacuous: guesses as good as a tenth of the noise would give are flagged."""
    rng = random.Random(7)
    scale = 1 / (EPSILON * 10)

    def laplace() -> float:
        return rng.expovariate(1 / scale) - rng.expovariate(1 / scale)

    hits = sum(1 + laplace() >= 0.5 for _ in range(TRIALS))
    false_alarms = sum(laplace() >= 0.5 for _ in range(TRIALS))
    assert _epsilon_lower_bound(hits, false_alarms, TRIALS) > EPSILON


def test_dp_phase_one_bounds_each_person_as_the_rule_declares(worlds: dict[str, Any]) -> None:
    """Before any noise, each group holds the sum over people of each person's bounded contribution: a row count of at
    most max_rows_per_group (1), one per person, the person's own sum clamped to [0, 2000] (their customer row read once,
    however many impressions join it; the whale's 50,000 adds 2,000), the person's own average; and a person counts in
    at most max_groups_per_person (6) groups."""
    text = (f"select i.campaign_id, count(*) as n, count(distinct c.customer_email) as p, sum(c.lifetime_value) as s, avg(c.lifetime_value) as a "
            f"{DP_JOIN} where i.campaign_id in ('spring_sale', 'summer_launch', 'new_year', 'zz_target') group by 1")
    got = pre_noise(worlds, text, B)
    joined = worlds["impressions"].merge(worlds["customers"], on="email")
    joined = joined[joined["campaign_id"].isin(["spring_sale", "summer_launch", "new_year", "zz_target"])]
    per = joined.groupby(["campaign_id", "email"]).agg(rows=("email", "size"), value=("lifetime_value", "first")).reset_index()
    assert (per.groupby("email").size() <= 6).all()  # nobody is capped here: the comparison is exact
    per["s"] = per["value"].clip(0, 2000)  # the person's own value once (one customer row), however many impressions
    per["a"] = per["value"].clip(0, 2000)
    expected = per.groupby("campaign_id").agg(n=("rows", lambda r: r.clip(upper=1).sum()), p=("email", "size"), s=("s", "sum"), a=("a", "sum"))
    assert (per["value"] > 2000).any() and (per["rows"] > 1).any(), "someone must be clamped and someone counted once over rows"
    for campaign, row in expected.iterrows():
        assert got[(campaign, "a1")] == row["n"] and got[(campaign, "a2")] == row["p"] and got[(campaign, "dcr_units")] == row["p"]
        assert got[(campaign, "a3")] == pytest.approx(row["s"]) and got[(campaign, "a4__sum")] == pytest.approx(row["a"])
        assert got[(campaign, "a4__n")] == row["p"]
    # Over every campaign (eight, with the injected ones) a person counts in at most six groups.
    every = pre_noise(worlds, f"select i.campaign_id, count(distinct c.customer_email) as p {DP_JOIN} group by 1", B)
    groups_per_person = worlds["impressions"].merge(worlds["customers"], on="email").groupby("email")["campaign_id"].nunique()
    assert sum(v for k, v in every.items() if k[-1] == "a1") == groups_per_person.clip(upper=6).sum()


def test_concurrent_dp_queries_never_overspend_the_runners_budget(worlds: dict[str, Any]) -> None:
    """Eight different DP queries at once against a budget with room for three: exactly three are answered and charged,
    the rest refused naming the budget; an identical query then is answered from the store at no cost."""
    from concurrent.futures import ThreadPoolExecutor

    from dcr_pipelines.lib.policy.models import Budget
    from dcr_pipelines.store import ledger

    loaded = worlds["loaded"][B]
    with psycopg.connect(worlds["url"]) as conn:
        spent = ledger.budget_status(conn, naming.results_schema(B), loaded.collaboration.budgets[0]).spent
    tight = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(
        update={"budgets": (Budget(consumer="ad_network", epsilon=spent + 3.5, delta=1e-5),)}))
    texts = [f"select c.loyalty_tier, count(*) as n {DP_JOIN} where {n} = {n} group by 1" for n in range(9001, 9009)]

    def run(text: str) -> tuple[str, Any]:
        checked = ad_hoc.check(tight, "ad_network", text)
        with psycopg.connect(worlds["url"], autocommit=True) as conn:
            try:
                return ("rows", ad_hoc_service.execute(conn, tight, checked, f"race-{next(_runs)}", text, staged_now(conn, tight)))
            except ad_hoc.QueryRefused as exc:
                return ("refused", str(exc))

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(run, texts))
    answered = [r for kind, r in outcomes if kind == "rows"]
    refused = [r for kind, r in outcomes if kind == "refused"]
    assert len(answered) == 3 and all(r.epsilon > 0.99 and not r.cached for r in answered)
    assert len(refused) == 5 and all("privacy budget of ad_network" in m and "(budget)" in m for m in refused)
    with psycopg.connect(worlds["url"]) as conn:
        assert ledger.budget_status(conn, naming.results_schema(B), tight.collaboration.budgets[0]).spent == pytest.approx(spent + 3, abs=1e-6)
    text, first = next((t, r) for t, (kind, r) in zip(texts, outcomes, strict=True) if kind == "rows")
    kind, again = run(text)
    assert kind == "rows" and again.cached and again.epsilon == 0 and again.rows == first.rows


def test_a_dp_query_the_budget_cannot_cover_reads_no_row(worlds: dict[str, Any]) -> None:
    """Refused by the budget before phase 1: no scan of the data a query names, so how long the refusal takes cannot
    depend on it (an outside test timed refusals of a self-join to tell customers from others)."""
    from dcr_pipelines.lib.policy.models import Budget
    from dcr_pipelines.store import ledger

    loaded = worlds["loaded"][B]
    with psycopg.connect(worlds["url"]) as conn:
        spent = ledger.budget_status(conn, naming.results_schema(B), loaded.collaboration.budgets[0]).spent
    broke = dataclasses.replace(loaded, collaboration=loaded.collaboration.model_copy(
        update={"budgets": (Budget(consumer="ad_network", epsilon=spent + 0.5, delta=1e-5),)}))
    staged = f"{naming.staging_schema(B, 'retailer')}.customers"

    def scans(conn: psycopg.Connection) -> int:
        conn.execute("select pg_stat_force_next_flush()")
        conn.execute("select 1")
        conn.execute("select pg_stat_clear_snapshot()")
        row = conn.execute("select coalesce(seq_scan, 0) + coalesce(idx_scan, 0) from pg_stat_user_tables where relid = %s::regclass", (staged,)).fetchone()
        return int(row[0]) if row else -1

    with psycopg.connect(worlds["url"], autocommit=True) as conn:
        for n, loaded_now in ((1, broke), (2, loaded)):
            text = f"select c.loyalty_tier, count(*) as n {DP_JOIN} where {7700 + n} = {7700 + n} group by 1"
            before = scans(conn)
            checked = ad_hoc.check(loaded_now, "ad_network", text)
            try:
                ad_hoc_service.execute(conn, loaded_now, checked, f"scan-{n}", text, staged_now(conn, loaded_now))
                answered = True
            except ad_hoc.QueryRefused as exc:
                assert "(budget)" in str(exc)
                answered = False
            after = scans(conn)
            assert answered == (loaded_now is loaded)
            assert (after > before) == answered, f"scans of {staged}: {before} -> {after} ({'answered' if answered else 'refused'})"
