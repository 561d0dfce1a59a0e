"""A member's `dcr query run` through its own login and the request path, against the operator's local `dcr query run`.

    .venv/bin/python benchmarks/members.py [--rounds 5] [--rows 2000]

A fresh deployment under a temporary DCR_HOME: `dcr db listen --port auto`, `dcr demo`, then `dcr serve demo`
answering in the background. The same exact (thresholded) ad-hoc question, its text varied by a literal so that
nothing is answered from a store, is asked alternately ``--rounds`` times each way, each a whole process:

- operator: `dcr query run demo --member ad_network SQL` (the query runs in that process, through Dagster);
- member: `dcr query run demo --credentials ad_network.json SQL` with no DCR_* variable (a request row over TCP,
  run by `dcr serve`, the answer read back as the member's login).

Reported: the median of each and the ratio member / operator (target: at most 1.5). Both print the same table.
Writes ``benchmarks/results/members.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DCR = [sys.executable, "-m", "dcr_pipelines.cli"]
QUERY = "select i.campaign_id, count(*) as n from impressions as i where {i} = {i} group by 1"


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cwd)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed: {done.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dcr-bench-members-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCR_", "DAGSTER_"))}
    env["DCR_HOME"] = str(home)
    member_env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    serve = None
    try:
        for argv in (["db", "listen", "--port", "auto"], ["demo", "--rows", str(args.rows)]):
            subprocess.run([*DCR, *argv], env=env, check=True, capture_output=True, cwd=ROOT)
        creds = home / "members" / "demo" / "ad_network.json"
        serve = subprocess.Popen([*DCR, "serve", "demo"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        timed([*DCR, "query", "run", "demo", "--credentials", str(creds), QUERY.format(i=1)], member_env, home)  # serve is warm
        operator, member = [], []
        for r in range(args.rounds):
            operator.append(timed([*DCR, "query", "run", "demo", "--member", "ad_network", QUERY.format(i=100 + r)], env, ROOT))
            member.append(timed([*DCR, "query", "run", "demo", "--credentials", str(creds), QUERY.format(i=200 + r)], member_env, home))
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=30)
        subprocess.run([*DCR, "db", "stop"], env=env, capture_output=True, check=False)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": args.rounds, "rows": args.rows,
        "operator_local_s": {"median": statistics.median(operator), "all": operator},
        "member_request_s": {"median": statistics.median(member), "all": member},
        "ratio_member_over_operator": statistics.median(member) / statistics.median(operator),
        "target": 1.5,
    }
    out = ROOT / "benchmarks" / "results" / "members.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"operator's local `dcr query run`: median {result['operator_local_s']['median']:.2f} s")
    print(f"member's `dcr query run` (login, request row, dcr serve): median {result['member_request_s']['median']:.2f} s")
    print(f"ratio {result['ratio_member_over_operator']:.2f} (target at most 1.5); written to {out}")


if __name__ == "__main__":
    main()
