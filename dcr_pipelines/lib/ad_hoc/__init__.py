"""Ad-hoc SQL, the pure part: ``checker`` decides what may run and plans it. ``services.ad_hoc`` runs the plan.

    checked = check(loaded, "ad_network", sql_text)   # or QueryRefused naming the rule
    result = services.ad_hoc.execute(conn, loaded, checked, run_id, sql_text, staged)
"""

from .checker import PRE_THRESHOLD, UNITS, CheckedQuery, QueryRefused, TableUse, check, datasets_named, hashable, query_sha256

__all__ = ["PRE_THRESHOLD", "UNITS", "CheckedQuery", "QueryRefused", "TableUse", "check", "datasets_named", "hashable", "query_sha256"]
