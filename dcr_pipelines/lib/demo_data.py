"""Synthetic uploads for the demo collaboration: a retailer's purchases and customers, an ad network's impressions.

Both parties draw customers from one population so that a chosen fraction of
the retailer's customers are also the ad network's users. Identifiers carry
the mess real uploads have (mixed case, stray whitespace) and normalise to
the same email. This is test data, not a privacy mechanism: numpy's
generator is fine here and is never used for noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = ("north", "south", "east", "west")
CAMPAIGNS = ("spring_sale", "summer_launch", "back_to_school", "black_friday", "holiday_gifts", "new_year")
DOMAINS = ("example.com", "mail.example.org", "shop.example.net", "gmail.com", "outlook.example")
TIERS = ("bronze", "silver", "gold")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
FIRST = ("ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hiro", "ines", "jonas", "kemi", "lena")


@dataclass(frozen=True)
class DemoFiles:
    purchases: Path
    impressions: Path
    retailer_customers: int
    ad_network_users: int
    shared_people: int
    customers: Path | None = None

    @property
    def uploads(self) -> tuple[Path, ...]:
        """Every generated upload, each at ``<party>/<dataset>/<file>``."""
        return tuple(p for p in (self.purchases, self.impressions, self.customers) if p is not None)


def people_counts(rows: int, overlap: float) -> tuple[int, int, int]:
    """(retailer customers, ad network users, shared) for ``rows`` rows per party.

    Each party has about half as many people as rows; ``overlap`` is the
    fraction of the retailer's customers who are also ad network users.
    """
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError("overlap must be between 0 and 1")
    customers = max(1, rows // 2)
    users = max(1, rows // 2)
    shared = round(overlap * min(customers, users))
    return customers, users, shared


def _emails(ids: np.ndarray) -> np.ndarray:
    first = np.array(FIRST)[ids % len(FIRST)]
    domain = np.array(DOMAINS)[(ids // 7) % len(DOMAINS)]
    return np.char.add(np.char.add(np.char.add(first, "."), ids.astype(str)), np.char.add("@", domain))


def _mess(emails: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixed case and surrounding whitespace on a fraction of identifiers."""
    out = emails.astype(object)
    upper = rng.random(len(out)) < 0.15
    title = rng.random(len(out)) < 0.10
    padded = rng.random(len(out)) < 0.10
    out[upper] = [e.upper() for e in out[upper]]
    out[title] = [e.capitalize() for e in out[title]]
    out[padded] = [f"  {e} " for e in out[padded]]
    return out


def _spread(people: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` person ids such that every person appears at least once (when rows allow)."""
    base = people[: min(len(people), rows)]
    extra = rng.choice(people, size=rows - len(base)) if rows > len(base) else np.array([], dtype=people.dtype)
    out = np.concatenate([base, extra])
    rng.shuffle(out)
    return out


def generate(out_dir: Path, rows: int = 10_000, overlap: float = 0.3, seed: int = 7) -> DemoFiles:
    """Write ``purchases.csv`` and ``impressions.csv`` (``rows`` rows each) and ``customers.csv`` (one row per retailer customer)."""
    rng = np.random.default_rng(seed)
    customers, users, shared = people_counts(rows, overlap)
    # Person ids: retailer = [0, customers); ad network = shared ones from the
    # retailer's range plus its own ids above it.
    retailer_people = rng.permutation(customers).astype(np.int64)
    shared_ids = retailer_people[:shared]
    own_ids = np.arange(customers, customers + users - shared, dtype=np.int64)
    ad_people = np.concatenate([shared_ids, own_ids])

    buyer = _spread(retailer_people, rows, rng)
    day0 = np.datetime64("2026-01-01")
    purchases = pd.DataFrame(
        {
            "customer_email": _mess(_emails(buyer), rng),
            "purchase_value": np.round(rng.gamma(2.0, 40.0, rows), 2),
            "purchase_date": (day0 + rng.integers(0, 180, rows).astype("timedelta64[D]")).astype(str),
            "store_region": np.array(REGIONS)[rng.integers(0, len(REGIONS), rows)],
        }
    )
    viewer = _spread(ad_people, rows, rng)
    seconds = rng.integers(0, 180 * 86400, rows).astype("timedelta64[s]")
    impressions = pd.DataFrame(
        {
            "user_email": _mess(_emails(viewer), rng),
            "campaign_id": np.array(CAMPAIGNS)[rng.integers(0, len(CAMPAIGNS), rows)],
            "impression_time": (np.datetime64("2026-01-01T00:00:00") + seconds).astype(str),
        }
    )
    # The retailer's loyalty profile: one row per customer (drawn last, so the other files do not change).
    customers_frame = pd.DataFrame(
        {
            "customer_email": _mess(_emails(np.sort(retailer_people)), rng),
            "loyalty_tier": np.array(TIERS)[rng.choice(len(TIERS), size=customers, p=[0.6, 0.3, 0.1])],
            "age_band": np.array(AGE_BANDS)[rng.integers(0, len(AGE_BANDS), customers)],
            "lifetime_value": np.round(rng.gamma(2.0, 250.0, customers), 2),
        }
    )
    purchases_path = out_dir / "retailer" / "purchases" / "purchases.csv"
    impressions_path = out_dir / "ad_network" / "impressions" / "impressions.csv"
    customers_path = out_dir / "retailer" / "customers" / "customers.csv"
    for frame, path in ((purchases, purchases_path), (impressions, impressions_path), (customers_frame, customers_path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(path)
    return DemoFiles(purchases_path, impressions_path, customers, users, shared, customers_path)
