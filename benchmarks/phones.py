"""What normalising phone numbers by their numbering plan costs, against normalising email addresses (same process).

    .venv/bin/python benchmarks/phones.py [--count 100000]

Phone numbers go through the `phonenumbers` library (lib/identifiers.py:phone), once per distinct number of a
dataset at ingest (store/phones.py); email addresses through the fixed rule SQL also applies. Both are timed on
``--count`` generated values written the ways exports write them; reported: microseconds per value of each, their
ratio, and what 1M and 10M distinct numbers cost on one core. Writes ``benchmarks/results/phones.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from dcr_pipelines.lib.identifiers import normalise, phone

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(5)
    forms = ["({a}) {e}-{l}", "{a}-{e}-{l}", "1-{a}-{e}-{l}", "+1 {a} {e} {l}", "011 1 {a} {e} {l}", "{a}.{e}.{l}"]
    phones = [rng.choice(forms).format(a=rng.randint(201, 989), e=rng.randint(200, 999), l=f"{rng.randint(0, 9999):04d}") for _ in range(args.count)]
    emails = [f"  User.{i}+tag@Example{i % 97}.COM " for i in range(args.count)]
    started = time.perf_counter()
    for text in phones:
        phone(text, "US")
    per_phone = (time.perf_counter() - started) / args.count * 1e6
    started = time.perf_counter()
    for text in emails:
        normalise(text, "email", {"drop_plus_tag": True})
    per_email = (time.perf_counter() - started) / args.count * 1e6
    result = {"count": args.count, "phone_us_per_value": round(per_phone, 2), "email_us_per_value": round(per_email, 2),
              "ratio_phone_email": round(per_phone / per_email, 1), "seconds_per_1m_distinct_phones": round(per_phone, 1),
              "seconds_per_10m_distinct_phones": round(per_phone * 10, 1), "python": platform.python_version()}
    print(f"phone: {per_phone:.1f} us per number; email: {per_email:.1f} us per address; ratio {per_phone / per_email:.1f}; "
          f"1M distinct numbers: {per_phone:.0f} s, 10M: {per_phone * 10:.0f} s on one core")
    out = ROOT / "benchmarks" / "results" / "phones.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
