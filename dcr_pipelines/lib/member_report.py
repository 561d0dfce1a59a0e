"""A member's report as a static HTML page: its releases with charts and intervals, its budget, every query over
its data, its uploads, and the audit chain's head to keep (`dcr report COLLAB --member MEMBER --out DIR`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from .chart import release_chart
from .policy import LoadedCollaboration
from .presentation import release_table

TEMPLATES = Path(__file__).parent / "templates"
ANCHOR_FILE = "chain-head.anchor.json"


def _query_row(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """One audit entry as a row of "every query over your data" (None: not a query)."""
    meta, asset = entry["metadata"], entry["asset"]
    stage = asset.split("/")[1] if asset.count("/") >= 2 else ""
    if stage != "results" or entry["kind"] not in ("materialization", "refused"):
        return None
    refused = entry["kind"] == "refused"
    if asset.endswith("/ad_hoc"):
        detail = meta.get("message", "") if refused else f"{meta.get('rows', 0)} row(s) released to {meta.get('runner', '')}"
        return {"time": entry["time"][:19].replace("T", " "), "what": "ad-hoc SQL", "who": meta.get("runner") or entry.get("user", ""),
                "query": meta.get("query", ""), "outcome": "refused" if refused else "answered", "css": "refused" if refused else "ok",
                "detail": detail}
    name = asset.rsplit("/", 1)[1]
    params = meta.get("params") or {}
    return {"time": entry["time"][:19].replace("T", " "), "what": f"release of {name}", "who": meta.get("consumer") or entry.get("user", ""),
            "query": f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})" if isinstance(params, dict) else name,
            "outcome": "refused" if refused else ("stored result" if meta.get("cached") else "released"),
            "css": "refused" if refused else "ok", "detail": meta.get("message", "") if refused else ""}


def write(view: Any, loaded: LoadedCollaboration, out_dir: Path) -> Path:
    """Write ``index.html``, its charts and the chain head into ``out_dir``; return the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = out_dir / "charts"
    releases = []
    for r in view.releases:
        spec = loaded.queries[r.query].spec
        chart = None
        if r.rows:
            release_chart(r.rows, list(spec.dimensions), list(spec.metrics), f"{view.collaboration}/{r.query}, release {r.release_id}",
                          charts / f"{r.query}.png")
            chart = f"charts/{r.query}.png"
        releases.append({"view": r, "table": release_table(spec, r.rows), "dims": len(spec.dimensions), "chart": chart,
                         "earlier": view.earlier_releases.get(r.query, 0), "params": json.dumps(r.params)})
    queries = [row for row in (_query_row(e) for e in reversed(view.activity)) if row is not None]
    if view.chain_head is not None:
        head = view.chain_head
        (out_dir / ANCHOR_FILE).write_text(json.dumps({"collaboration": head.collaboration, "seq": head.seq,
                                                       "chain_sha256": head.chain_sha256}, indent=2) + "\n", encoding="utf-8")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
    page = out_dir / "index.html"
    page.write_text(env.get_template("member_report.html.j2").render(v=view, releases=releases, queries=queries, anchor_file=ANCHOR_FILE),
                    encoding="utf-8")
    return page
