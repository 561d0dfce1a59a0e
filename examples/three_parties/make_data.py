"""Write the three-party example's uploads: ``python examples/three_parties/make_data.py LANDING [--people N] [--seed S]``.

Every generated person has one email and one phone number. The airline holds some people by email, the telecom some
by phone (written as people write them), the bank some by email, phone or both. Then, for example:
``DCR_POLICIES=examples DCR_LANDING=LANDING dcr run three_parties``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pandas as pd


def people(n: int, seed: int) -> pd.DataFrame:
    """One row per person: what each party holds of them (``bank_has`` is email, phone, both or none)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "email": f"person{i}@example.org", "phone": f"+1212{rng.randint(200, 999)}{i:04d}",
            "bank_has": rng.choice(["email", "phone", "both", "both", "none"]), "segment": rng.choice(["retail", "private"]),
            "telecom": rng.random() < 0.7, "plan": rng.choice(["prepaid", "contract"]),
            "airline": rng.random() < 0.7, "status": rng.choice(["basic", "silver", "gold"]),
        })
    return pd.DataFrame(rows)


def _written(e164: str, rng: random.Random) -> str:
    area, exchange, line = e164[2:5], e164[5:8], e164[8:]
    return rng.choice([f"({area}) {exchange}-{line}", f"{area}-{exchange}-{line}", f"1-{area}-{exchange}-{line}", e164])


def write(landing: Path, frame: pd.DataFrame, seed: int = 0) -> None:
    rng = random.Random(seed)
    bank = frame[frame.bank_has != "none"]
    accounts = pd.DataFrame({
        "email": [None if h == "phone" else e.upper() if rng.random() < 0.2 else e for e, h in zip(bank.email, bank.bank_has, strict=True)],
        "phone": [None if h == "email" else _written(p, rng) for p, h in zip(bank.phone, bank.bank_has, strict=True)],
        "segment": bank.segment,
    })
    telecom = frame[frame.telecom]
    subscribers = pd.DataFrame({"msisdn": [_written(p, rng) for p in telecom.phone], "plan": telecom.plan})
    airline = frame[frame.airline]
    flyers = pd.DataFrame({"email": airline.email, "status": airline.status})
    for party, dataset, table in (("bank", "accounts", accounts), ("telecom", "subscribers", subscribers), ("airline", "flyers", flyers)):
        folder = landing / "three_parties" / party / dataset
        folder.mkdir(parents=True, exist_ok=True)
        table.sample(frac=1, random_state=seed).to_csv(folder / f"{dataset}.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("landing", type=Path)
    parser.add_argument("--people", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    write(args.landing, people(args.people, args.seed), args.seed)
    print(f"wrote the bank's, the telecom's and the airline's uploads under {args.landing / 'three_parties'}")


if __name__ == "__main__":
    main()
