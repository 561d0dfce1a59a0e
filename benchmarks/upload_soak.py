"""Soak the upload queue: many uploads (good, duplicate, hostile, withdrawn), kills at random instants and database restarts.

    .venv/bin/python benchmarks/upload_soak.py [--minutes 3] [--seed 1]

Runs on a fresh embedded PostgreSQL under a temporary DCR_HOME, with the demo's
purchases (replace mode) and impressions (append mode). A worker process
imports once and forks one ingest per step; about half the steps are killed
(SIGKILL) at a random instant; every tenth step the database server is
stopped and started again. After every step, the next start's pass runs and
the invariants are checked: every upload decided and its file where its state
says, no upload loaded twice, the replace dataset at its newest accepted
upload, the append dataset equal to the union of its accepted files, no
leftover tables. Prints what it tried and what held; writes
benchmarks/results/upload_soak.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

WORKER = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import great_expectations  # noqa: F401
    import psycopg
    from dcr_pipelines.lib import naming
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.services import ingest
    policies, landing, url = sys.argv[1:4]
    loaded = load_collaboration(Path(policies) / "demo")
    def target(name):
        ds = loaded.collaboration.datasets[name]
        return ingest.Target("soak", ds.owner, name, ds, naming.raw_schema("soak", ds.owner), Path(landing), url)
    for line in sys.stdin:
        action, dataset, arg = line.split()
        pid = os.fork()
        if pid == 0:
            t = target(dataset)
            with psycopg.connect(url, autocommit=True) as conn:
                if action == "land":
                    ingest.land_copy(conn, t, Path(arg))
                elif action == "drop":
                    t.inbox.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(arg, t.inbox / ("." + Path(arg).name))
                    os.replace(t.inbox / ("." + Path(arg).name), t.inbox / Path(arg).name)
                if action == "withdraw":
                    try:
                        ingest.withdraw(conn, t, int(arg))
                    except ingest.UploadRejected:
                        pass
                ingest.process_queue(conn, t)
            os._exit(0)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) else "finished", flush=True)
""")

PURCHASES = "customer_email,purchase_value,purchase_date,store_region\n"
IMPRESSIONS = "user_email,campaign_id,impression_time\n"
REGIONS = ("north", "south", "east", "west")


def purchases(rng: random.Random, n: int) -> str:
    base = rng.randrange(10**6)
    return PURCHASES + "".join(f"p{base + i}@example.com,{rng.randint(1, 900)},2026-02-{rng.randint(1, 28):02d},{rng.choice(REGIONS)}\n"
                               for i in range(n))


def impressions(rng: random.Random, n: int) -> str:
    base = rng.randrange(10**6)
    return IMPRESSIONS + "".join(f"v{base + i}@example.com,spring_sale,2026-03-{rng.randint(1, 28):02d} 10:00:00\n" for i in range(n))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


HOSTILE = [
    ("empty.csv", b""),
    ("header_only.csv", PURCHASES.encode()),
    ("latin1.csv", (PURCHASES + "jos\u00e9@example.com,1,2026-02-01,north\n").encode("latin-1")),
    ("ragged.csv", (PURCHASES + "a@example.com,1\n").encode()),
    ("long_line.csv", b"x" * (2 << 20) + b"\n"),
    ("cut.csv.gz", _truncated(gzip.compress((PURCHASES + "".join(f"c{i}@example.com,{i % 97},2026-02-01,north\n" for i in range(5000))).encode()))),
]


def check(conn: Any, ingest: Any, queue: Any, targets: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    problems: list[str] = []
    for name, t in targets.items():
        ups = queue.listing(conn, "soak", t.party, name, limit=10**6)
        for u in ups:
            if u.state in ("queued", "processing"):
                problems.append(f"{name}: upload #{u.seq} left {u.state}")
                continue
            places = [os.path.lexists(d / u.stored_name) for d in (t.queue_dir, t.accepted_dir, t.quarantine_dir)]
            if u.state == "accepted" and places != [False, True, False]:
                problems.append(f"{name}: accepted upload #{u.seq} misplaced {places}")
            if u.state not in ("accepted", "withdrawn") and (places[0] or not places[2]):
                problems.append(f"{name}: {u.state} upload #{u.seq} misplaced {places}")
        current = ingest.current_version(conn, t)
        if current is None:
            continue
        count = conn.execute(f'select count(*) from "{t.schema}"."{name}"').fetchone()[0]
        if count != current.row_count:
            problems.append(f"{name}: view has {count} rows, version {current.version} says {current.row_count}")
        accepted = [u for u in ups if u.state == "accepted"]
        if t.spec.mode == "replace":
            newest = max(accepted, key=lambda u: u.seq)
            if current.upload_seq != newest.seq or count != sizes.get(newest.checksum):
                problems.append(f"{name}: current version {current.version} (upload #{current.upload_seq}, {count} rows) is not the newest "
                                f"accepted upload #{newest.seq} ({newest.file_name}, {sizes.get(newest.checksum or '')} rows)")
        else:
            seqs = [int(p.split("__u")[1].split("_")[0]) for p in current.parts]
            if len(seqs) != len(set(seqs)):
                problems.append(f"{name}: an upload is in the version twice: {seqs}")
            if sorted(seqs) != sorted(u.seq for u in accepted):
                problems.append(f"{name}: version parts {sorted(seqs)} != accepted uploads {sorted(u.seq for u in accepted)}")
            if count != sum(sizes.get(u.checksum or "", -10**9) for u in accepted):
                problems.append(f"{name}: rows {count} != the accepted files' rows")
        kept: set[str] = set()
        for (parts,) in conn.execute("select parts from dcr_meta.dataset_versions where collaboration = 'soak' and dataset = %s "
                                     "order by version desc limit %s", (name, ingest.KEEP_VERSIONS)).fetchall():
            kept.update(parts or [])
        tables = {r[0] for r in conn.execute("select table_name from information_schema.tables where table_schema = %s and table_type = 'BASE TABLE' "
                                             "and table_name like %s", (t.schema, f"{name}__%")).fetchall()}
        if tables - kept:
            problems.append(f"{name}: leftover tables {sorted(tables - kept)}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = Path(tempfile.mkdtemp(prefix="dcr_soak_"))
    os.environ["DCR_HOME"] = str(home)
    os.environ.pop("DCR_DATABASE_URL", None)
    import hashlib

    import psycopg

    from dcr_pipelines.lib import naming
    from dcr_pipelines.lib.database import stop_embedded
    from dcr_pipelines.lib.policy import load_collaboration
    from dcr_pipelines.lib.runtime import activate
    from dcr_pipelines.lib.settings import PROJECT_ROOT
    from dcr_pipelines.services import ingest
    from dcr_pipelines.store import uploads as queue

    runtime = activate()
    url = runtime.warehouse.url()
    landing = runtime.settings.landing
    loaded = load_collaboration(PROJECT_ROOT / "policies" / "demo")
    targets = {}
    for name in ("purchases", "impressions"):
        ds = loaded.collaboration.datasets[name]
        if name == "purchases":
            ds = ds.model_copy(update={"max_duplicate_fraction": None})
        targets[name] = ingest.Target("soak", ds.owner, name, ds, naming.raw_schema("soak", ds.owner), landing, url)
    worker_policies = home / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", worker_policies)
    text = (worker_policies / "demo" / "collaboration.yaml").read_text().replace("max_duplicate_fraction: 0.05", "max_duplicate_fraction: null")
    (worker_policies / "demo" / "collaboration.yaml").write_text(text)
    files = home / "files"
    files.mkdir()
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(worker_policies), str(landing), url],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    tried: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    sent: dict[str, list[Path]] = {"purchases": [], "impressions": []}
    violations: list[str] = []
    kills = restarts = steps = 0
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    while time.monotonic() < deadline:
        steps += 1
        dataset = rng.choice(list(targets))
        roll = rng.random()
        if roll < 0.15 and sent[dataset]:
            kind, path = "duplicate", rng.choice(sent[dataset])
        elif roll < 0.30:
            name, content = rng.choice(HOSTILE)
            kind, path = f"hostile {name}", files / f"{steps}_{name}"
            path.write_bytes(content)
        elif roll < 0.38 and dataset == "impressions":
            with psycopg.connect(url, autocommit=True) as conn:
                accepted = queue.listing(conn, "soak", "ad_network", "impressions", states=("accepted",))
            kind, path = "withdraw", Path(str(rng.choice(accepted).seq) if accepted else "0")
        else:
            n = rng.randint(200, 4000)
            text = purchases(rng, n) if dataset == "purchases" else impressions(rng, n)
            path = files / f"{steps}_{dataset}.csv"
            path.write_text(text)
            sizes[hashlib.sha256(text.encode()).hexdigest()] = n
            sent[dataset].append(path)
            kind = "good file"
        action = "withdraw" if kind == "withdraw" else rng.choice(["land", "drop"])
        tried[kind.split()[0] if kind.startswith("hostile") else kind] += 1
        worker.stdin.write(f"{action} {dataset} {path}\n")
        worker.stdin.flush()
        child = int(worker.stdout.readline())
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, 0.6))
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        kills += worker.stdout.readline().strip() == "killed"
        if steps % 10 == 0:
            stop_embedded(home)  # the next command starts it again, as after a crash or a reboot (a fresh process: pgserver caches its server)
            subprocess.run([sys.executable, "-c", f"from pathlib import Path; from dcr_pipelines.lib.database import start_embedded; start_embedded(Path({str(home)!r}))"],
                           check=True)
            restarts += 1
        with psycopg.connect(url, autocommit=True) as conn:
            for t in targets.values():
                ingest.process_queue(conn, t)
            found = check(conn, ingest, queue, targets, sizes)
        violations += [f"step {steps}: {p}" for p in found]
    worker.stdin.close()
    worker.wait(timeout=60)
    with psycopg.connect(url, autocommit=True) as conn:
        states = Counter(u.state for name, t in targets.items() for u in queue.listing(conn, "soak", t.party, name, limit=10**6))
        rows = {name: (ingest.current_version(conn, t).row_count if ingest.current_version(conn, t) else 0) for name, t in targets.items()}
    figures = {
        "seconds": round(time.monotonic() - started, 1), "steps": steps, "tried": dict(tried), "killed": kills, "database_restarts": restarts,
        "uploads_by_final_state": dict(states), "rows_now": rows, "invariant_violations": len(violations), "violations": violations[:50],
        "held": not violations,
    }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "upload_soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    stop_embedded(home)
    shutil.rmtree(home, ignore_errors=True)
    if violations:
        sys.exit(1)


if __name__ == "__main__":
    main()
