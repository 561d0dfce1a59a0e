"""The demo generator: sizes, overlap, realistic mess, determinism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dcr_pipelines.lib import demo_data


def _people(path: Path, column: str) -> set[str]:
    return set(pd.read_csv(path)[column].str.strip().str.lower())


@pytest.mark.parametrize(("rows", "overlap"), [(1_000, 0.3), (5_000, 0.0), (2_000, 1.0), (3_001, 0.55)])
def test_sizes_and_overlap_are_as_requested(tmp_path: Path, rows: int, overlap: float) -> None:
    files = demo_data.generate(tmp_path, rows=rows, overlap=overlap, seed=3)
    purchases = pd.read_csv(files.purchases)
    impressions = pd.read_csv(files.impressions)
    assert len(purchases) == rows and len(impressions) == rows
    customers = _people(files.purchases, "customer_email")
    users = _people(files.impressions, "user_email")
    assert len(customers) == files.retailer_customers
    assert len(users) == files.ad_network_users
    shared = len(customers & users)
    assert shared == files.shared_people
    assert abs(shared / len(customers) - overlap) <= 0.01


def test_identifiers_carry_case_and_whitespace_mess(tmp_path: Path) -> None:
    files = demo_data.generate(tmp_path, rows=2_000, overlap=0.5, seed=1)
    raw = pd.read_csv(files.purchases)["customer_email"]
    assert (raw != raw.str.strip()).any(), "some identifiers have surrounding whitespace"
    assert (raw.str.strip() != raw.str.strip().str.lower()).any(), "some identifiers are not lowercase"


def test_the_same_seed_gives_the_same_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a = demo_data.generate(tmp_path / "a", rows=500, overlap=0.3, seed=11)
    b = demo_data.generate(tmp_path / "b", rows=500, overlap=0.3, seed=11)
    c = demo_data.generate(tmp_path / "c", rows=500, overlap=0.3, seed=12)
    assert a.purchases.read_bytes() == b.purchases.read_bytes()
    assert a.purchases.read_bytes() != c.purchases.read_bytes()


@pytest.mark.parametrize(("rows", "overlap"), [(0, 0.3), (10, -0.1), (10, 1.5)])
def test_impossible_requests_are_refused(tmp_path: Path, rows: int, overlap: float) -> None:
    with pytest.raises(ValueError):
        demo_data.generate(tmp_path, rows=rows, overlap=overlap)
