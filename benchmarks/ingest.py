"""Ingest and validate a generated CSV of many rows; report rows per second and peak memory.

    .venv/bin/python benchmarks/ingest.py [--rows 10000000]

Generates the demo retailer's purchases file in chunks (never the whole file
in memory), then loads it with the same code path as `dcr ingest` minus
Dagster: the upload queue, COPY in chunks, typed cast, duplicates, the
great-expectations contract in PostgreSQL, the atomic swap; and, as the
baseline in the same process, a bare COPY of the file. Runs on a fresh embedded PostgreSQL under a
temporary DCR_HOME. Writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK = 1_000_000


def generate(path: Path, rows: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    regions = np.array(["north", "south", "east", "west"])
    with path.open("w") as handle:
        handle.write("customer_email,purchase_value,purchase_date,store_region\n")
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            ids = rng.integers(0, rows // 2 + 1, n)
            frame = pd.DataFrame({
                "customer_email": np.char.add(np.char.add("user", ids.astype(str)), "@example.com"),
                "purchase_value": np.round(rng.gamma(2.0, 40.0, n), 2),
                "purchase_date": (np.datetime64("2026-01-01") + rng.integers(0, 180, n).astype("timedelta64[D]")).astype(str),
                "store_region": regions[rng.integers(0, 4, n)],
            })
            frame.to_csv(handle, header=False, index=False)


def load(data: Path) -> dict[str, object]:
    """Ingest ``data`` in this (child) process through the upload queue; its peak RSS is the ingest's alone.

    The baseline, in the same process on the same server: a bare ``COPY`` of the file into an unlogged text table.
    """
    from dcr_pipelines.lib import naming
    from dcr_pipelines.lib.database import connect
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.lib.runtime import activate
    from dcr_pipelines.lib.settings import PROJECT_ROOT
    from dcr_pipelines.services import ingest

    runtime = activate()
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    ds = loaded.collaboration.datasets["purchases"]
    url = runtime.warehouse.url()
    size = data.stat().st_size
    with connect(url) as conn:
        conn.execute("create unlogged table bare_copy (customer_email text, purchase_value text, purchase_date text, store_region text)")
        t0 = time.perf_counter()
        with conn.cursor().copy("copy bare_copy from stdin with (format csv, header true)") as copy, data.open("rb") as handle:
            while block := handle.read(1 << 20):
                copy.write(block)
        baseline = time.perf_counter() - t0
        conn.execute("drop table bare_copy")
    target = ingest.Target("demo", "retailer", "purchases", ds, naming.raw_schema("demo", "retailer"), runtime.settings.landing, url)
    t0 = time.perf_counter()
    with connect(url) as conn:
        ingest.land_copy(conn, target, data)
        outcome = ingest.process_queue(conn, target)
    seconds = time.perf_counter() - t0
    if not outcome.loaded:
        raise SystemExit(f"the upload was not accepted: {[u.reason for u in outcome.decided]}")
    upload, report, _ = outcome.loaded[-1]
    rows = int(upload.row_count or 0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "rows": rows, "file_mb": round(size / 1e6, 1), "ingest_and_validate_seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds), "bare_copy_seconds": round(baseline, 1),
        "ratio_to_bare_copy": round(seconds / baseline, 2), "peak_rss_mb_ingesting_process": round(peak_mb, 1),
        "validation_rules": len(report.outcomes),
        "note": "landing copy + checksum, decode and line-ending normalisation, COPY, typed cast, duplicate count, great-expectations, swap; "
                "PostgreSQL runs in its own process and is not included in the peak RSS figure.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load)))
        return
    home = Path(tempfile.mkdtemp(prefix="dcr_bench_"))
    os.environ["DCR_HOME"] = str(home)
    os.environ.pop("DCR_DATABASE_URL", None)
    data = home / "purchases.csv"
    t0 = time.perf_counter()
    generate(data, args.rows)
    print(f"generated {args.rows:,} rows ({data.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
    child = subprocess.run([sys.executable, __file__, "--load", str(data)], capture_output=True, text=True, env=os.environ)
    if child.returncode != 0:
        sys.exit(child.stderr[-3000:])
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    pid = (home / "pg" / "postmaster.pid").read_text().splitlines()[0]
    os.kill(int(pid), 2)
    time.sleep(2)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
