"""Attacks on the release mechanisms, run against the real opendp measurements the releases use.

Each attack is shown to work with differential privacy switched off (so the
test can fail) and to fail, within a stated statistical margin, with the
noise the policy configures.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import opendp.mod
import pytest

from dcr_pipelines.lib.policy.models import QuerySpec
from dcr_pipelines.lib.privacy.mechanisms import NoisePlan, add_noise, plan_key_selection, plan_release, select_keys
from dcr_pipelines.lib.settings import PROJECT_ROOT

# The attacker's analysis code may use numpy freely; only the clean room's noise must come from opendp.
RNG = np.random.default_rng(20261123)


def _spec(metrics: dict, *, epsilon: float, groups: int = 1, dimensions: dict | None = None) -> QuerySpec:
    return QuerySpec.model_validate(
        {
            "consumer": "c",
            "receivers": ["c"],
            "dimensions": dimensions or {"d": {"domain": ["x"]}},
            "metrics": metrics,
            "contribution": {"max_groups_per_unit": groups, "max_rows_per_group": 1},
            "privacy": {"epsilon": epsilon},
        }
    )


def _binomial_margin(p: float, n: int, z: float = 4.0) -> float:
    return z * math.sqrt(max(p * (1 - p), 1e-12) / n)


# --- differencing -----------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.5, 1.0])
def test_differencing_guesses_membership_no_better_than_epsilon_allows(epsilon: float) -> None:
    """Releases over everyone and over everyone-but-the-target, for many targets.

    The attacker knows every other person's data exactly and guesses the
    target is present when the difference of the two noisy counts exceeds
    one half. Pure epsilon-DP bounds any guess's accuracy by
    e^eps / (1 + e^eps) for the epsilon spent on the target.
    """
    plan = plan_release(_spec({"n": {"aggregate": "count_units"}}, epsilon=epsilon))[0]
    targets, trials = 50, 80
    base = RNG.integers(20, 200, size=targets)
    correct_dp = correct_plain = 0
    for t in range(targets):
        members = RNG.integers(0, 2, size=trials)
        everyone = [int(base[t] + m) for m in members]
        without = [int(base[t])] * trials
        noisy_everyone = add_noise(plan, everyone)
        noisy_without = add_noise(plan, without)
        for m, a, b, pa, pb in zip(members, noisy_everyone, noisy_without, everyone, without, strict=False):
            correct_dp += int((a - b > 0.5) == bool(m))
            correct_plain += int((pa - pb > 0.5) == bool(m))
    n = targets * trials
    spent = 2 * plan.epsilon  # both releases are charged; only the first depends on the target
    bound = math.exp(spent) / (1 + math.exp(spent))
    assert correct_plain == n, "without noise the attack always succeeds"
    assert correct_dp / n <= bound + _binomial_margin(bound, n)


# --- reconstruction ---------------------------------------------------------------


def _reconstruct(answers: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    estimate, *_ = np.linalg.lstsq(subsets.astype(float), answers.astype(float), rcond=None)
    return (estimate > 0.5).astype(int)


def test_dinur_nissim_reconstruction_needs_the_noise_off() -> None:
    """Random subset counts recover the secret bits without noise, and about chance with the policy's budget.

    n = 200 people, m = 800 subset-count queries, the whole budget epsilon 10
    spent on them: one person is in up to m subsets, so the L1 sensitivity of
    the answer vector is m and opendp's scale is m / 10 = 80. Least squares
    then has a per-bit error of about 80 / sqrt(m / 4) = 5.7, so a bit is
    recovered with probability Phi(0.5 / 5.7) = 0.535. Stated margin: 0.15
    (4 standard deviations of the recovered fraction over 200 bits).
    """
    n, m = 200, 800
    secret = RNG.integers(0, 2, size=n)
    subsets = RNG.integers(0, 2, size=(m, n))
    exact = subsets @ secret
    assert (_reconstruct(exact, subsets) == secret).mean() == 1.0, "the attack works on exact answers"

    plan = plan_release(_spec({"n": {"aggregate": "count_units"}}, epsilon=10.0, groups=m))[0]
    assert plan.sensitivity == m
    noisy = np.array(add_noise(plan, [int(v) for v in exact]))
    recovered = (_reconstruct(noisy, subsets) == secret).mean()
    assert recovered <= 0.535 + 0.15


# --- empirical privacy --------------------------------------------------------------


def _empirical_epsilon(plan: NoisePlan, samples: int = 200_000) -> float:
    """A high-confidence lower bound on the privacy loss observed between neighbouring inputs.

    Neighbours differ by one person's largest contribution (the plan's
    sensitivity). Events: the output at or above the larger input, and at or
    below the smaller one (where the Laplace likelihood ratio is largest).
    """
    c = 1000.0
    delta = plan.sensitivity
    with_person = np.array(add_noise(plan, [c + delta] * samples))
    without = np.array(add_noise(plan, [c] * samples))
    lower = 0.0
    for p1, p2 in (
        ((with_person >= c + delta).mean(), (without >= c + delta).mean()),
        ((without <= c).mean(), (with_person <= c).mean()),
    ):
        p1_low = p1 - _binomial_margin(p1, samples)
        p2_high = p2 + _binomial_margin(p2, samples)
        if p1_low > 0 and p2_high > 0:
            lower = max(lower, math.log(p1_low / p2_high))
    return lower


PLANS = {
    "count_units (discrete laplace)": {"n": {"aggregate": "count_units"}},
    "count (discrete laplace)": {"n": {"aggregate": "count"}},
    "sum (laplace)": {"s": {"aggregate": "sum", "column": "v", "bounds": [0, 300]}},
}


@pytest.mark.slow  # statistical: 30 to 60 s; `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("metrics", PLANS.values(), ids=PLANS.keys())
def test_each_mechanism_loses_no_more_privacy_than_configured_and_a_halved_scale_is_caught(metrics: dict) -> None:
    plan = plan_release(_spec(metrics, epsilon=1.0, groups=2))[0]
    measured = _empirical_epsilon(plan)
    assert measured <= plan.epsilon * 1.05, f"observed privacy loss {measured:.3f} above epsilon {plan.epsilon:.3f}"
    assert measured >= plan.epsilon * 0.8, "the estimator sees the real loss, so it could see a larger one"
    planted = dataclasses.replace(plan, scale=plan.scale / 2)  # a test-only build with half the noise
    assert _empirical_epsilon(planted) > plan.epsilon * 1.05, "half the noise scale must be detected"


# --- key selection -------------------------------------------------------------------


def test_a_rare_key_never_appears_just_because_it_exists() -> None:
    spec = _spec({"n": {"aggregate": "count_units"}}, epsilon=1.0, groups=1, dimensions={"region": {"key_selection_delta": 1e-6}})
    selection = plan_key_selection(spec)
    assert selection is not None and selection.delta <= 1e-6
    seen_rare = seen_common = 0
    for _ in range(2_000):
        released = select_keys(selection, {"rare": 1, "common": 500})
        seen_rare += "rare" in released
        seen_common += "common" in released
    # delta <= 1e-6 allows about 0.002 appearances in 2,000 releases; two would be a 1-in-100,000 event.
    assert seen_rare <= 1
    assert seen_common == 2_000


# --- hygiene ---------------------------------------------------------------------------


def _modules() -> list[Path]:
    return list((PROJECT_ROOT / "dcr_pipelines").rglob("*.py"))


def test_no_noise_comes_from_random_or_numpy() -> None:
    """Only opendp draws noise. numpy's generator is allowed in the demo-data generator alone."""
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(n == "random" or n.startswith(("random.", "numpy.random")) for n in names), path
            if isinstance(node, ast.Attribute) and node.attr in {"random", "default_rng", "laplace", "normal", "exponential"}:
                assert path.name == "demo_data.py", f"{path}: {ast.unparse(node)}"


def test_unsafe_opendp_features_are_never_enabled() -> None:
    import dcr_pipelines.lib.privacy.mechanisms  # noqa: F401  (enables what the release path enables)

    assert {"contrib"} == opendp.mod.GLOBAL_FEATURES
    for path in _modules():
        text = path.read_text()
        assert "floating-point" not in text and "honest-but-curious" not in text, path
