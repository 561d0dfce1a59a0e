"""Interactive commands against the `import dagster` reference, best of N, in one script (issue 20, target 3).

    .venv/bin/python benchmarks/interactive.py [--repeat 3] [--rows 2000]

On a fresh deployment under a temporary DCR_HOME (embedded PostgreSQL): `dcr demo` first,
then each command is timed as a whole process, best of ``--repeat``, next to
`python -c "import dagster"` timed the same way in the same run. Targets: read-only
commands (query check, budget, audit, overlap) at most 1.5x the reference; `query run`
and a cached `release` at most 4x; a fresh release at most 4x plus its query's SQL time
(reported, not separated here). Also timed: the floor of any command that reads Dagster's event
log or run storage, `import dagster, dagster_postgres` (the storage classes the instance needs),
printed as each command's ratio to that floor. Writes ``benchmarks/results/interactive.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUERY = ("select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers "
         "from impressions as i inner join customers as c on c.customer_email = i.user_email group by 1, 2")
TARGETS = {"query check": 1.5, "budget": 1.5, "audit": 1.5, "overlap": 1.5, "query run": 4.0, "release (cached)": 4.0, "release (fresh)": 4.0}


def best(argv: list[str], env: dict[str, str], repeat: int, vary: bool = False) -> float:
    times = []
    for i in range(repeat):
        args = [a.replace("{i}", f"{i + 2:02d}") for a in argv] if vary else argv
        started = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
        times.append(elapsed)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dcr-bench-interactive-"))
    env = {**os.environ, "DCR_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    dcr = str(BIN / "dcr")
    try:
        subprocess.run([dcr, "demo", "--rows", str(args.rows)], env=env, check=True, capture_output=True, cwd=ROOT)
        reference = best([sys.executable, "-c", "import dagster"], env, args.repeat)
        floor = best([sys.executable, "-c", "import dagster, dagster_postgres"], env, args.repeat)
        commands = {
            "query check": [dcr, "query", "check", "demo", "--member", "ad_network", QUERY],
            "budget": [dcr, "budget", "demo"],
            "audit": [dcr, "audit", "demo"],
            "overlap": [dcr, "overlap", "demo"],
            "query run": [dcr, "query", "run", "demo", "--member", "ad_network", QUERY],
            "release (cached)": [dcr, "release", "demo", "tier_reach"],
            "release (fresh)": [dcr, "release", "demo", "tier_reach", "--param", "since=2026-01-{i}"],  # threshold rule: no budget spent
        }
        rows = []
        for name, argv in commands.items():
            seconds = best(argv, env, args.repeat, vary=name == "release (fresh)")
            ratio = seconds / reference
            rows.append({"command": name, "seconds": round(seconds, 3), "ratio": round(ratio, 2), "target": TARGETS[name], "met": ratio <= TARGETS[name],
                         "ratio_to_storage_floor": round(seconds / floor, 2)})
    finally:
        subprocess.run([dcr, "db", "stop"], env=env, capture_output=True, cwd=ROOT)
    print(f"reference: python -c 'import dagster' {reference:.2f} s (best of {args.repeat})")
    print(f"storage floor: python -c 'import dagster, dagster_postgres' {floor:.2f} s = {floor / reference:.2f}x the reference")
    print(f"{'command':<18} {'seconds':>8} {'ratio':>6} {'target':>7}  met  {'/floor':>6}")
    for r in rows:
        print(f"{r['command']:<18} {r['seconds']:>8.2f} {r['ratio']:>6.2f} {r['target']:>6.1f}x  {'yes' if r['met'] else 'no ':<3}  {r['ratio_to_storage_floor']:>6.2f}")
    out = ROOT / "benchmarks" / "results" / "interactive.json"
    out.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "repeat": args.repeat,
                               "rows": args.rows, "reference_import_dagster_s": round(reference, 3),
                               "storage_floor_import_dagster_postgres_s": round(floor, 3), "commands": rows}, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
