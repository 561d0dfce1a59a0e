"""What protects each data owner's data, and whether a policy change loosens it.

Every party (a member that provides a dataset) approves a *protection
document*: everything in ``collaboration.yaml`` that decides how its data
can be exposed — who the members are and what they may do, its datasets'
shared columns, column roles, row filters and analysis rules, every budget,
how the overlap is released, padding, difference checks and the ad-hoc cap.
``dcr policy approve COLLAB --member PARTY`` keeps the approved document in
``protections/<party>.json`` beside ``collaboration.yaml``.

A later policy may tighten any of it without a new approval; a change that
loosens anything (a lower threshold, a larger budget, a new member or
ability, a new allowed function, a looser rule type, ...) is refused until
the owner approves the new document. ``loosened`` lists what changed, with
the ``collaboration.yaml`` path to point at.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .models import Collaboration

FOLDER = "protections"
RULE_ORDER = {"dp": 0, "custom": 1, "differential_privacy": 2, "aggregation": 3, "list": 4}  # how much a rule lets out, least first
OVERLAP_ORDER = {"withheld": 0, "dp": 1, "exact": 2}

Path_ = tuple[str | int, ...]


def document(collab: Collaboration, party: str) -> dict[str, Any]:
    """Everything that decides how ``party``'s data can be exposed, as plain JSON."""
    datasets = {}
    for name, ds in collab.datasets.items():
        if ds.owner != party:
            continue
        rule = ds.analysis_rule
        datasets[name] = {
            "shared": sorted(ds.shared_columns),
            "columns": {c: {"dimension": s.dimension, "aggregate": sorted(a.value for a in s.aggregate), "join": s.join, "list": s.list}
                        for c, s in sorted(ds.columns.items())},
            "row_filters": sorted(json.dumps(f.model_dump(mode="json"), sort_keys=True) for f in ds.row_filters),
            "rule": {"type": rule.type, "min_distinct_units": rule.min_distinct_units, "join_required": rule.join_required,
                     "scalar_functions": sorted(rule.scalar_functions), "join_operators": sorted(rule.join_operators),
                     **({"epsilon_per_query": rule.epsilon_per_query, "key_selection_delta": rule.key_selection_delta}
                        if rule.type == "differential_privacy" else {})},
        }
    m = collab.matching
    return {
        "party": party,
        "members": {name: sorted(a.value for a in member.abilities) for name, member in sorted(collab.members.items())},
        "datasets": datasets,
        "budgets": {b.consumer: {"epsilon": b.epsilon, "delta": b.delta, "period_days": b.period_days} for b in collab.budgets},
        "matching": {"overlap_release": m.overlap_release, "overlap_epsilon": m.overlap_epsilon, "overlap_budget": m.overlap_budget, "padding": m.padding},
        "difference_checks": {"enabled": collab.difference_checks.enabled, "retention_days": collab.difference_checks.retention_days},
        "ad_hoc": {"max_queries_per_day": collab.ad_hoc.max_queries_per_day},
    }


def digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def snapshot_path(folder: Path, party: str) -> Path:
    return Path(folder) / FOLDER / f"{party}.json"


def write_snapshot(folder: Path, collab: Collaboration, party: str) -> Path:
    doc = document(collab, party)
    path = snapshot_path(folder, party)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sha256": digest(doc), "approved": doc}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _more(now: float | None, then: float | None) -> bool:
    return now is not None and then is not None and now > then + 1e-12


def loosened(approved: dict[str, Any], current: dict[str, Any], collab: Collaboration) -> list[tuple[Path_, str]]:
    """Each way ``current`` exposes more than ``approved``: (collaboration.yaml path, what changed)."""
    out: list[tuple[Path_, str]] = []
    for name, abilities in current["members"].items():
        before = approved["members"].get(name)
        if before is None:
            out.append((("members", name), f"new member {name}"))
        elif set(abilities) - set(before):
            out.append((("members", name, "abilities"), f"{name} gains {', '.join(sorted(set(abilities) - set(before)))}"))
    for name in approved["datasets"]:
        if name not in current["datasets"] and name in collab.datasets:
            out.append((("datasets", name, "owner"), f"{name} moves from {approved['party']} to {collab.datasets[name].owner}, "
                                                     "who could then loosen its rules alone"))
    for name, ds in current["datasets"].items():
        where: Path_ = ("datasets", name)
        before = approved["datasets"].get(name)
        if before is None:
            out.append((where, f"new dataset {name}"))
            continue
        if set(ds["shared"]) - set(before["shared"]):
            out.append(((*where, "shared"), f"{name} shares {', '.join(sorted(set(ds['shared']) - set(before['shared'])))} too"))
        for col, roles in ds["columns"].items():
            was = before["columns"].get(col, {"dimension": False, "aggregate": [], "join": False, "list": False})
            gained = [r for r in ("dimension", "join", "list") if roles[r] and not was[r]] + sorted(set(roles["aggregate"]) - set(was["aggregate"]))
            if gained:
                out.append(((*where, "columns", col), f"{name}.{col} may now be used as {', '.join(gained)}"))
        if set(before["row_filters"]) - set(ds["row_filters"]):
            out.append(((*where, "row_filters"), f"a row filter of {name} was removed or changed"))
        rule, was_rule = ds["rule"], before["rule"]
        if RULE_ORDER[rule["type"]] > RULE_ORDER[was_rule["type"]]:
            out.append(((*where, "analysis_rule", "type"), f"the analysis rule of {name} goes from {was_rule['type']} to {rule['type']}"))
        noised_now = rule["type"] == "differential_privacy" and was_rule["type"] in ("aggregation", "list")  # noise replaces the exact threshold
        if rule["min_distinct_units"] < was_rule["min_distinct_units"] and not noised_now:
            out.append(((*where, "analysis_rule", "min_distinct_units"),
                        f"the threshold of {name} goes from {was_rule['min_distinct_units']} to {rule['min_distinct_units']}"))
        if was_rule["join_required"] and not rule["join_required"]:
            out.append(((*where, "analysis_rule", "join_required"), f"{name} no longer requires a join with the runner's data"))
        for key in ("scalar_functions", "join_operators"):
            extra = set(rule[key]) - set(was_rule[key])
            if extra:
                out.append(((*where, "analysis_rule", key), f"{name} allows {', '.join(sorted(extra))} too"))
        for key in ("epsilon_per_query", "key_selection_delta"):
            if key in rule and _more(rule[key], was_rule.get(key, rule[key])):
                out.append(((*where, "analysis_rule", key), f"the {key} of {name} goes from {was_rule[key]} to {rule[key]}"))
    indexes = {b.consumer: i for i, b in enumerate(collab.budgets)}
    for consumer, budget in current["budgets"].items():
        where = ("budgets", indexes.get(consumer, 0))
        before = approved["budgets"].get(consumer)
        if before is None:
            out.append((where, f"new budget for {consumer}"))
            continue
        for key in ("epsilon", "delta"):
            if _more(budget[key], before[key]):
                out.append(((*where, key), f"the {key} of {consumer}'s budget goes from {before[key]} to {budget[key]}"))
        now_days, was_days = budget["period_days"], before["period_days"]
        if now_days is not None and (was_days is None or now_days < was_days):  # a lifetime budget (no period) is the tightest
            was = "never (a lifetime budget)" if was_days is None else f"every {was_days} days"
            out.append(((*where, "period_days"), f"{consumer}'s budget refreshes sooner: {was} -> every {now_days} days"))
    m, was_m = current["matching"], approved["matching"]
    if OVERLAP_ORDER[m["overlap_release"]] > OVERLAP_ORDER[was_m["overlap_release"]]:
        out.append((("matching", "overlap_release"), f"the overlap goes from {was_m['overlap_release']} to {m['overlap_release']}"))
    for key in ("overlap_epsilon", "overlap_budget"):
        if m["overlap_release"] == "dp" and _more(m[key], was_m[key]):
            out.append((("matching", key), f"{key} goes from {was_m[key]} to {m[key]}"))
    if was_m["padding"] and not m["padding"]:
        out.append((("matching", "padding"), "the cross-reference is no longer padded"))
    d, was_d = current["difference_checks"], approved["difference_checks"]
    if was_d["enabled"] and not d["enabled"]:
        out.append((("difference_checks", "enabled"), "difference checks are turned off"))
    if d["retention_days"] < was_d["retention_days"]:
        out.append((("difference_checks", "retention_days"), f"difference checks remember {d['retention_days']} days instead of {was_d['retention_days']}"))
    cap, was_cap = current["ad_hoc"]["max_queries_per_day"], approved["ad_hoc"]["max_queries_per_day"]
    if was_cap is not None and (cap is None or cap > was_cap):
        out.append((("ad_hoc", "max_queries_per_day"), f"the ad-hoc cap goes from {was_cap} to {cap if cap is not None else 'none'}"))
    return out
