"""The ``dcr`` command line. Every command that changes state runs through Dagster.

Exit codes: 0 success; 1 a run or release failed or was refused; 2 bad
usage or invalid input (policy, parameters, unknown names); 3 the
infrastructure failed (database unreachable or missing, disk full,
permission denied): nothing was changed, run it again once fixed.
"""

from . import db, demo, member, pipeline, policy, psi, query, report, uploads
from ._common import main

__all__ = ["db", "demo", "main", "member", "pipeline", "policy", "psi", "query", "report", "uploads"]
