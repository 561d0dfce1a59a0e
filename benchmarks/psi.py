"""PSI stage against single-process openmined-psi on the same data; writes benchmarks/results/psi_<n>.json.

    .venv/bin/python benchmarks/psi.py --size 100000 [--size 1000000]

Baseline: one process, one bucket, the library's client and server halves
(RAW container), as the library's own example runs it. Ours: the matching
stage (hash buckets over worker processes, one per core) on the same
identifiers with a planted overlap of 30%. Times are wall seconds in this
script; peak RSS is this process's (the workers' is reported separately).
Matching inside a key epoch is measured by ``benchmarks/key_epoch.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

from dcr_pipelines.lib.matching import PartyInput, match
from dcr_pipelines.lib.psi import PsiClient, PsiServer, blind, new_key, reblind


def parties(n: int) -> tuple[PartyInput, PartyInput]:
    shared = int(n * 0.3)
    a = [f"person{i}@example.com" for i in range(n)]
    b = [f"person{i}@example.com" for i in range(shared)] + [f"other{i}@example.org" for i in range(n - shared)]
    return PartyInput("a", [f"ta{i}" for i in range(n)], a), PartyInput("b", [f"tb{i}" for i in range(n)], b)


def baseline(a: PartyInput, b: PartyInput) -> tuple[int, int]:
    client, server = PsiClient(), PsiServer()
    setup = server.setup_message(b.identifiers, len(a.identifiers))
    request = client.request(a.identifiers)
    response = server.answer(request)
    return len(client.intersection(setup, response)), len(setup) + len(request) + len(response)


def ec_floor(a: PartyInput, b: PartyInput, sample: int = 20_000) -> dict[str, float]:
    """The elliptic-curve floor of this machine for one match of ``a`` and ``b``: the protocol blinds every identity
    (hash to the curve, one scalar multiplication) and reblinds it once (one multiplication), on both sides; each
    operation's time is measured here on ``sample`` identities, and the total is divided by the cores."""
    items = a.identifiers[:sample]
    t0 = time.perf_counter()
    once = blind(new_key(), items)
    per_blind = (time.perf_counter() - t0) / len(items)
    t0 = time.perf_counter()
    reblind(new_key(), once)
    per_reblind = (time.perf_counter() - t0) / len(items)
    n = len(a.identifiers) + len(b.identifiers)
    cores = os.cpu_count() or 1
    return {"seconds_per_blind": per_blind, "seconds_per_reblind": per_reblind,
            "floor_seconds": n * (per_blind + per_reblind) / cores, "scalar_multiplications": 2 * n, "cores": cores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, action="append", help="identifiers per party (repeatable)")
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    for n in args.size or [100_000]:
        a, b = parties(n)
        t0 = time.perf_counter()
        found, base_bytes = baseline(a, b)
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = match([a, b], "a", buckets=args.buckets)
        ours_s = time.perf_counter() - t0
        assert found == result.matched == int(n * 0.3)
        floor = ec_floor(a, b)
        figures = {
            "machine": platform.platform(), "cpus": os.cpu_count(), "size_per_party": n, "matched": result.matched,
            "baseline_single_process_seconds": round(base_s, 2), "our_stage_seconds": round(ours_s, 2),
            "ratio_ours_to_baseline": round(ours_s / base_s, 3), "buckets": args.buckets,
            "bytes_per_element_baseline": round(base_bytes / (2 * n), 1), "bytes_per_element_ours": round(result.bytes_exchanged / (2 * n), 1),
            "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_largest_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "ec_floor_seconds": round(floor["floor_seconds"], 2), "ec_scalar_multiplications": floor["scalar_multiplications"],
            "ec_seconds_per_blind_us": round(floor["seconds_per_blind"] * 1e6, 1), "ec_seconds_per_reblind_us": round(floor["seconds_per_reblind"] * 1e6, 1),
            "ratio_ours_to_ec_floor": round(ours_s / floor["floor_seconds"], 3),
            "note": "ours includes pairing the matches and drawing match_ids; both include serialising every message; "
                    "the floor is (blind + reblind) per identity on both sides, divided by the cores",
        }
        print(json.dumps(figures, indent=2), flush=True)
        out = Path(__file__).parent / "results" / f"psi_{n}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
