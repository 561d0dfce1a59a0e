"""Ad-hoc SQL: ``checker`` decides what may run and plans it (pure); ``execution`` runs it (database).

    checked = check(loaded, "ad_network", sql_text)   # or QueryRefused naming the rule
    result = execute(conn, loaded, checked, run_id, sql_text)
"""

from .checker import PRE_THRESHOLD, UNITS, CheckedQuery, QueryRefused, TableUse, check, datasets_named, hashable, query_sha256
from .execution import AdHocResult, execute, results_table, stored_result, stored_rows

__all__ = [
    "PRE_THRESHOLD", "UNITS", "AdHocResult", "CheckedQuery", "QueryRefused", "TableUse", "check", "datasets_named", "execute", "hashable",
    "query_sha256", "results_table", "stored_result", "stored_rows",
]
