"""`dcr policy new NAME [--parties a,b]`: a new collaboration folder that `dcr policy check` accepts as it is.

Every field is written out with a comment saying what it does (the same
defaults the models have), so the files are the place to start editing:
one dataset per party, one differentially private query over them, every
party's approval of that query and of what protects its data (written by
the same function as `dcr policy approve`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .approve import approve_all
from .loader import COLLABORATION_FILE, QUERIES_DIR, PolicyError, load_collaboration, query_sha256
from .models import NAME_PATTERN

DEFAULT_PARTIES = ("party_a", "party_b")
QUERY = "overview"
SEGMENTS = ("north", "south", "east", "west")


class ScaffoldError(ValueError):
    """The collaboration cannot be created as asked (the message names the fix)."""


def dataset_name(parties: list[str], party: str) -> str:
    """``<party>_records``, or ``records_<n>`` where that would be longer than a name may be."""
    name = f"{party}_records"
    return name if re.fullmatch(NAME_PATTERN, name) else f"records_{parties.index(party) + 1}"


def _members(parties: list[str]) -> str:
    out = []
    for i, party in enumerate(parties):
        abilities = "provide_data, run_queries, receive_results" if i == 0 else "provide_data, receive_results"
        out.append(f"""  {party}:
    display_name: {party}             # shown in the UI and reports; optional
    abilities: [{abilities}]   # provide_data | run_queries | receive_results
    # contact: privacy@{party}.example   # optional""")
    return "\n".join(out)


def _datasets(parties: list[str]) -> str:
    out = []
    for party in parties:
        out.append(f"""  {dataset_name(parties, party)}:
    owner: {party}                   # the member that uploads it (needs provide_data)
    description: One row per customer of {party}; replace with what the file holds.   # free text, shown in the UI
    format: {{type: csv}}             # csv | parquet | jsonl; csv also takes delimiter, quote, encoding
    mode: replace                    # replace: each accepted file is the whole dataset | append: each file adds its rows
    unknown_columns: reject          # reject | ignore columns the file has but this policy does not declare
    rows: {{min: 1}}                  # an upload with fewer rows (or more than max:) is refused
    duplicates: keep                 # exact repeats of an earlier row: keep | drop the extra copies | reject the file
    # max_duplicate_fraction: 0.05   # optional: at most this share of rows may repeat an earlier row
    # expectations: []               # optional: great-expectations checks of your own, {{type: expect_..., kwargs: {{...}}}}
    columns:
      email:
        type: text                   # text | integer | numeric | date | timestamp | boolean
        identifier: email            # the identity.kind column: tokenised, never leaves the party's raw schema
        nullable: false              # a null or blank value refuses the upload
        join: true                   # queries join through it (via match_id); never output
        max_invalid_fraction: 0.0    # share of identifiers allowed to fail the email format check
      segment:
        type: text                   # a text column
        dimension: true              # may be a group key
        allowed_values: [{', '.join(SEGMENTS)}]   # any other value refuses the upload
      amount:
        type: numeric                # a number (integer: whole numbers only)
        aggregate: [sum, avg]        # what may be aggregated: count | count_distinct | sum | sum_distinct | avg | ...
        range: [0, 100000]           # values outside refuse the upload
        nullable: false              # a missing amount refuses the upload
    shared: [segment, amount]        # non-identifier columns that leave the raw schema (default: all of them)
    row_filters: []                  # e.g. - {{column: amount, op: ">=", value: 0}}; ops = != < <= > >= in not_in is_not_null
    analysis_rule:
      type: differential_privacy     # differential_privacy: approved queries and ad-hoc SQL answered with noise, charged to the
                                     #   runner's budget | dp: only approved DP queries | custom: only approved queries |
                                     #   aggregation: exact thresholded ad-hoc SQL (not DP) | list: SELECT DISTINCT lists
      join_required: true            # ad-hoc SQL must inner-join a table of the runner
      epsilon_per_query: 1.0         # what one ad-hoc query costs; an identical query over the same data is free
      max_groups_per_person: 1       # groups one person may count in, per answer (more: more noise per group)
      max_rows_per_group: 1          # rows of one person COUNT(*) counts per group
      key_selection_delta: 1.0e-6    # groups without a public domain (allowed_values) are released by DP key selection
      bounds: {{amount: [0, 1000]}}    # what one person adds to a group's SUM or AVG of the column, at most
      scalar_functions: [lower, upper, round, date_trunc, extract, coalesce]   # allowed in WHERE, GROUP BY and aggregates
      min_distinct_units: 0          # aggregation/list/threshold: output rows need at least this many distinct people""")
    return "\n".join(out)


def _approvals(parties: list[str], digest: str) -> str:
    entries = "\n".join(f'    - member: {party}\n      sha256: "{digest}"' for party in parties)
    return f"""  {QUERY}:                         # every party approves every query's sha256 (`dcr policy hash` prints it)
{entries}"""


def collaboration_yaml(name: str, parties: list[str], digest: str) -> str:
    consumer = parties[0]
    return f"""# The collaboration {name}: every organisation, its data and what may be asked of it. Written by
# `dcr policy new`; edit it, run `dcr policy check`, and have every party approve the result
# (`dcr policy approve {name} --member <party>`). Field reference: docs/policy-reference.md.
name: {name}                         # must equal the folder name
description: What {', '.join(parties)} want to learn together; replace this line.   # free text, shown in the UI

members:                             # every organisation in the collaboration
{_members(parties)}

identity:                            # how people are linked across parties
  kind: email                        # email | phone | customer_id: every dataset has a column of this kind
  email:
    gmail_drop_dots: false           # true: ana.b@gmail.com is anab@gmail.com
    drop_plus_tag: false             # true: ana+news@x.com is ana@x.com

matching:                            # private set intersection between the parties' identifiers
  client: {consumer}                 # the party whose half runs as the PSI client (default: the first party)
  buckets: 1                         # hash buckets matched in parallel processes (same result for any count)
  padding: false                     # true: pad the cross-reference so its size does not reveal the overlap
  overlap_release: withheld          # what members learn of the number of shared people: withheld | dp | exact
  overlap_epsilon: 0.1               # dp: epsilon of each release of that number
  overlap_budget: 1.0                # dp: epsilon of all overlap releases in any 30 days
  home_parties: []                   # parties that keep identifiers at home and run `dcr psi`

datasets:                            # one per party here; a party may own several
{_datasets(parties)}

budgets:                             # privacy budget of each member that runs queries
  - consumer: {consumer}             # needs run_queries
    epsilon: 10.0                    # total epsilon per period
    delta: 1.0e-5                    # only DP key selection spends delta (ad-hoc groups without a public domain)
    period_days: 30                  # rolling window; remove for a budget that never refreshes

approvals:                           # written by `dcr policy approve {name} --member <party>` (again after every change
                                     # of a query): each party's approval of each query's sha256
{_approvals(parties, digest)}

schedules: []                        # e.g. - {{name: nightly, cron: "0 3 * * *", target: all}}; target: all | matching | queries;
                                     # created stopped (turn them on in the UI)

difference_checks:                   # thresholded rows whose people differ from an earlier row's by fewer than
  enabled: true                      # the threshold are withheld
  retention_days: 365                # how long a released row's people are kept for the comparison

ad_hoc: {{}}                          # e.g. {{max_queries_per_day: 200}}: ad-hoc runs per runner in any 24 hours (refused ones too)
"""


def query_sql(parties: list[str]) -> str:
    first, second = dataset_name(parties, parties[0]), dataset_name(parties, parties[1])
    return f"""-- One row per shared person and {parties[0]}'s segment, with what {parties[1]} recorded for that person.
-- Datasets are named as in collaboration.yaml and hold their shared columns plus match_id (the privacy
-- unit), for matched people only. The query outputs match_id, every dimension and every metric column.
select
    a.match_id,
    a.segment,
    sum(b.amount) as amount
from {first} as a
inner join {second} as b on b.match_id = a.match_id
group by a.match_id, a.segment
"""


def query_yaml(parties: list[str]) -> str:
    return f"""# An approved query: {QUERY}.sql beside this file. Its SHA-256 over both files is what every party approves.
description: Shared people and {parties[1]}'s amount by {parties[0]}'s segment (differentially private).   # free text
rule: dp                             # dp: noise from opendp, charged to the consumer's budget | threshold: exact, small groups removed
consumer: {parties[0]}               # whose budget pays (needs run_queries)
receivers: [{', '.join(parties)}]    # who may read the result (need receive_results)
parameters: {{}}                       # e.g. since: {{type: date, default: "2026-01-01"}}, written :since in the SQL
dimensions:                          # dp: each group key declares its public domain (every value is released)
  segment:
    domain: [{', '.join(SEGMENTS)}]   # the values of {parties[0]}'s segment column
metrics:                             # aggregates of the query's rows, per group
  people: {{aggregate: count_units}}  # distinct people per group
  amount: {{aggregate: sum, column: amount, bounds: [0, 1000], epsilon_share: 2}}   # values clamped to bounds; 2/3 of epsilon
contribution:                        # how much one person may change the result (the noise is scaled to it)
  max_groups_per_unit: 1             # groups one person may appear in
  max_rows_per_group: 1              # rows one person may contribute to one group
privacy:
  epsilon: 1.0                       # what one release costs the consumer
release: on_demand                   # on_demand: only `dcr release` | scheduled: also the policy's schedules
"""


COMMENT_COLUMN = 37


def aligned(text: str) -> str:
    """Line up the trailing comments of a YAML text at one column (after the code, if the code is longer)."""
    out = []
    for line in text.splitlines():
        code, sep, comment = line.partition(" #")
        if sep and code.strip() and not code.lstrip().startswith("#"):
            line = f"{code.rstrip():<{COMMENT_COLUMN - 1}} #{comment.rstrip()}" if len(code.rstrip()) < COMMENT_COLUMN - 1 else f"{code.rstrip()}  #{comment}"
        out.append(line)
    return "\n".join(out) + "\n"


def parse_parties(text: str | None) -> list[str]:
    parties = [p.strip() for p in text.split(",")] if text else list(DEFAULT_PARTIES)
    parties = [p for p in parties if p]
    for party in parties:
        if not re.fullmatch(NAME_PATTERN, party):
            raise ScaffoldError(f"--parties: {party!r} is not a member name: lowercase letters, digits and _, starting with a letter, "
                                "at most 40 characters")
    if len(parties) < 2:
        raise ScaffoldError("--parties: a collaboration needs at least two parties, e.g. --parties retailer,publisher")
    if len(set(parties)) != len(parties):
        raise ScaffoldError(f"--parties: {', '.join(parties)} names a party twice")
    return parties


def create(root: Path, name: str, parties: list[str]) -> Path:
    """Write ``root/name`` (refused if it exists), have every party approve it, and check it loads; returns the folder.

    The files are written into a temporary folder under ``root`` and moved into place once they pass, so a
    refused scaffold leaves nothing behind and no reader ever sees half a collaboration.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise ScaffoldError(f"{name!r} is not a collaboration name: lowercase letters, digits and _, starting with a letter, at most 40 characters")
    target = root / name
    if os.path.lexists(target):
        raise ScaffoldError(f"{target} already exists: choose another name, or edit that folder")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dcr-new-", dir=root))
    try:
        folder = staging / name
        (folder / QUERIES_DIR).mkdir(parents=True)
        sql_text, spec_text = query_sql(parties), aligned(query_yaml(parties))
        (folder / QUERIES_DIR / f"{QUERY}.sql").write_text(sql_text, encoding="utf-8")
        (folder / QUERIES_DIR / f"{QUERY}.yaml").write_text(spec_text, encoding="utf-8")
        (folder / COLLABORATION_FILE).write_text(aligned(collaboration_yaml(name, parties, query_sha256(sql_text, spec_text))), encoding="utf-8")
        try:
            approve_all(folder)  # the approvals again, and each party's protections/<party>.json, as `dcr policy approve` writes them
            load_collaboration(folder)
        except PolicyError as exc:  # e.g. names so long that a role name exceeds PostgreSQL's 63 characters
            raise ScaffoldError(exc.issues[0].message) from None
        try:
            os.rename(folder, target)  # fails if the name was taken meanwhile
        except OSError:
            raise ScaffoldError(f"{target} already exists: choose another name, or edit that folder") from None
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
