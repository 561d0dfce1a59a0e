"""Matching on one, then two identifiers (lib/identity_graph.py) against the elliptic-curve floor of the same
identities, and the one-identifier matcher of lib/matching.py on the same data; writes benchmarks/results/identifiers.json.

    .venv/bin/python benchmarks/identifiers.py [--size 100000] [--parties 2]

Every person has an email and a phone number; each party holds every one of its people by both. The floor per
identifier kind is ``psi.ec_floor`` (blind + reblind of every identity on both sides, divided by the cores). Targets:
each identifier's share of the graph match within 1.2x of its floor; the cost of the second identifier is printed
(seconds and ratio to one identifier). Ratios are measured in this one script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from psi import ec_floor

from dcr_pipelines.lib import identity_graph
from dcr_pipelines.lib.matching import PartyInput, match

TARGET = 1.2


def records(n: int, parties: int) -> list[identity_graph.PartyRecords]:
    """``parties`` parties of ``n`` people each; 30% of each party's people are in every party."""
    shared = int(n * 0.3)
    out = []
    for p in range(parties):
        people = [*range(shared), *range(n * (p + 1), n * (p + 1) + n - shared)]
        rows = [(f"e{p}_{i}", f"person{i}@example.com", f"f{p}_{i}", f"+1212{i:07d}") for i in people]
        out.append(identity_graph.PartyRecords(f"party{p}", ("email", "phone"), rows))
    return out


def only(kinds: tuple[str, ...], recs: list[identity_graph.PartyRecords]) -> list[identity_graph.PartyRecords]:
    idx = [("email", "phone").index(k) for k in kinds]
    return [identity_graph.PartyRecords(r.party, kinds, [tuple(v for i in idx for v in row[2 * i:2 * i + 2]) for row in r.records]) for r in recs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="people per party")
    parser.add_argument("--parties", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    n, recs = args.size, records(args.size, args.parties)
    parties = tuple(r.party for r in recs)
    a = PartyInput("a", [r[0] for r in recs[0].records], [r[1] for r in recs[0].records])
    b = PartyInput("b", [r[0] for r in recs[1].records], [r[1] for r in recs[1].records])
    pairs = len(identity_graph.pairs_needed([parties], parties[0]))
    floor = ec_floor(a, b)["floor_seconds"] * pairs  # one identifier kind, every pair

    t0 = time.perf_counter()
    single = match([a, b], "a", buckets=args.buckets) if args.parties == 2 else None
    single_s = time.perf_counter() - t0
    timings = {}
    for kinds in (("email",), ("email", "phone")):
        t0 = time.perf_counter()
        result = identity_graph.match(only(kinds, recs), [parties], parties[0], kinds, "any_of", buckets=args.buckets)
        timings[kinds] = time.perf_counter() - t0
        assert result.overlaps[parties].matched == int(n * 0.3), result.overlaps[parties].matched
    one, two = timings[("email",)], timings[("email", "phone")]
    figures = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "people_per_party": n, "parties": args.parties, "buckets": args.buckets,
        "matched": int(n * 0.3),
        "ec_floor_seconds_per_identifier": round(floor, 2),
        "one_identifier_seconds": round(one, 2), "two_identifiers_seconds": round(two, 2),
        "ratio_one_identifier_to_floor": round(one / floor, 3),
        "ratio_per_identifier_to_floor_with_two": round(two / 2 / floor, 3),
        "target_ratio_per_identifier": TARGET,
        "second_identifier_extra_seconds": round(two - one, 2), "ratio_two_to_one_identifier": round(two / one, 3),
        **({"single_identifier_matcher_seconds": round(single_s, 2), "ratio_graph_to_single_matcher": round(one / single_s, 3)} if single else {}),
        "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": "the graph match holds every party's records in memory and adds pairing and the union of records into people; "
                "the floor is (blind + reblind) per identity on both sides of every pair, divided by the cores",
    }
    for key in ("ratio_one_identifier_to_floor", "ratio_per_identifier_to_floor_with_two"):
        print(f"{key}: {figures[key]} (target <= {TARGET}: {'met' if figures[key] <= TARGET else 'NOT met'})")
    print(f"second identifier: +{figures['second_identifier_extra_seconds']} s ({figures['ratio_two_to_one_identifier']}x one identifier)")
    print(json.dumps(figures, indent=2), flush=True)
    out = Path(__file__).parent / "results" / "identifiers.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
