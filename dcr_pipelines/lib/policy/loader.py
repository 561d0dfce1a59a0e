"""Read a collaboration folder into typed models, reporting mistakes by file, line and field.

YAML is read with ruamel.yaml's round-trip loader so that every key and item
keeps its line and column; pydantic validates shape and types; the checks
below validate the references between parts (a dataset's owner is a member,
a query reads datasets that exist, every owner approved the query's hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlglot
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from .. import naming
from .models import Ability, AggregateFunction, Collaboration, ColumnType, MetricKind, QuerySpec

COLLABORATION_FILE = "collaboration.yaml"
QUERIES_DIR = "queries"


@dataclass(frozen=True)
class PolicyIssue:
    """One mistake in a policy file, located for a human."""

    file: Path
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyError(Exception):
    """Raised when a collaboration folder does not describe a valid collaboration."""

    def __init__(self, issues: Sequence[PolicyIssue]):
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(frozen=True)
class ApprovedQuery:
    name: str
    spec: QuerySpec
    sql: str
    spec_path: Path
    sql_path: Path
    sha256: str
    datasets: tuple[str, ...]
    placeholders: tuple[str, ...]


@dataclass(frozen=True)
class LoadedCollaboration:
    collaboration: Collaboration
    folder: Path
    queries: dict[str, ApprovedQuery] = field(default_factory=dict)
    policy_sha256: str = ""

    @property
    def name(self) -> str:
        return self.collaboration.name

    def parties(self) -> tuple[str, ...]:
        """Members that own at least one dataset, in declaration order."""
        owners = {d.owner for d in self.collaboration.datasets.values()}
        return tuple(m for m in self.collaboration.members if m in owners)

    def matching_client(self) -> str:
        """The party whose half runs PSI as client (the first party not at home unless declared)."""
        home = self.collaboration.matching.home_parties
        return self.collaboration.matching.client or next((p for p in self.parties() if p not in home), self.parties()[0])

    def at_home(self, party: str) -> bool:
        """Whether the party keeps its identifiers and keys at home (uploads tokens, runs `dcr psi`)."""
        return party in self.collaboration.matching.home_parties

    def query_parties(self, query: str | ApprovedQuery) -> tuple[str, ...]:
        """The parties whose shared people a query reads (an approved query's name, or a query being checked): its
        declared ``parties`` (in declaration order), else all."""
        declared = set((self.queries[query] if isinstance(query, str) else query).spec.parties)
        return tuple(p for p in self.parties() if p in declared) if declared else self.parties()

    def overlaps(self) -> tuple[tuple[str, ...], ...]:
        """Every set of parties a cross-reference is built for: all parties first, then each subset a query reads."""
        out = [self.parties()]
        for name in sorted(self.queries):
            subset = self.query_parties(name)
            if subset not in out:
                out.append(subset)
        return tuple(out)

    def graph_matching(self) -> bool:
        """Matching on several identifiers or for subsets of the parties (lib/identity_graph.py), not the one-identifier,
        all-parties protocol of lib/matching.py."""
        return len(self.collaboration.identity.kinds) > 1 or len(self.overlaps()) > 1


def query_sha256(sql_text: str, spec_text: str) -> str:
    """The hash owners approve: SHA-256 over the query's SQL and its YAML spec, byte for byte."""
    digest = hashlib.sha256()
    for part in (sql_text, spec_text):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


# --- YAML with positions -------------------------------------------------------


MAX_POLICY_BYTES = 1_000_000  # the demo's collaboration.yaml is 6 KB
MAX_POLICY_DEPTH = 32


def _screen_yaml(path: Path, text: str, yaml: YAML) -> None:
    """Refuse what a policy never needs and an attacker would use: aliases (an alias bomb expands a few KB into
    gigabytes), deep nesting, huge files. Read as parser events, so nothing is built before the refusal."""
    from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent

    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError([PolicyIssue(path, None, None, "", f"the file is larger than {MAX_POLICY_BYTES // 1000} KB; a policy file is a few KB")])
    depth = 0
    for event in yaml.parse(text):
        where = event.start_mark
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None):
            raise PolicyError([PolicyIssue(path, where.line + 1, where.column + 1, "",
                                           "YAML anchors and aliases (&name, *name) are not allowed in policy files: write each value out")])
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_POLICY_DEPTH:
                raise PolicyError([PolicyIssue(path, where.line + 1, where.column + 1, "", f"nested more than {MAX_POLICY_DEPTH} levels deep")])
        elif isinstance(event, CollectionEndEvent):
            depth -= 1


TEMPLATE_MARKERS = ("{{", "{%", "{#")


def template_markers(path: Path, text: str) -> list[PolicyIssue]:
    """Every place a policy file holds text that a template engine would run (Jinja's ``{{``, ``{%``, ``{#``).

    Policy values are data: they reach generated SQL only as quoted literals, identifiers or re-generated
    expressions (and every brace is made inert there too), so such text is refused rather than trusted.
    """
    issues = []
    for number, line in enumerate(text.splitlines(), start=1):
        for marker in TEMPLATE_MARKERS:
            at = line.find(marker)
            if at >= 0:
                issues.append(PolicyIssue(path, number, at + 1, "", f"{marker!r} opens a template tag; policy text is data and may not hold "
                                                                    "template syntax ({{, {%, {#), not even in a comment or a string"))
                break
    return issues


def _read_yaml(path: Path) -> tuple[Any, str]:
    text = path.read_text(encoding="utf-8")
    yaml = YAML(typ="rt")
    try:
        _screen_yaml(path, text, yaml)
        markers = template_markers(path, text)
        if markers:
            raise PolicyError(markers)
        data = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise PolicyError([PolicyIssue(path, line, column, "", f"invalid YAML: {exc.problem}")]) from None
    return data, text


def _plain(node: Any) -> Any:
    """ruamel containers to plain dicts and lists (pydantic sees ordinary data)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def locate(node: Any, path: Iterable[str | int]) -> tuple[int | None, int | None]:
    """1-based (line, column) of the deepest part of ``path`` that exists in ``node``."""
    line: int | None = None
    column: int | None = None
    if isinstance(node, (CommentedMap, CommentedSeq)):
        line, column = node.lc.line + 1, node.lc.col + 1
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            key_line, key_col = node.lc.key(part)
            line, column = key_line + 1, key_col + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            item_line, item_col = node.lc.item(part)
            line, column = item_line + 1, item_col + 1
            node = node[part]
        else:
            break
    return line, column


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_issues(exc: ValidationError, path: Path, data: Any) -> list[PolicyIssue]:
    issues = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        # pydantic appends the union/enum branch names; keep only the parts that exist in the file
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the policy format)"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "enum":
            expected = err.get("ctx", {}).get("expected", "")
            message = f"{err['input']!r} is not one of {expected}"
        elif err["type"] == "value_error":  # our validators' own sentences, without pydantic's "Value error, " prefix
            message = str(message).removeprefix("Value error, ")
        line, column = locate(data, loc)
        issues.append(PolicyIssue(path, line, column, _dotted(loc), message))
    return issues


# --- loading ---------------------------------------------------------------------


_LOADED: dict[tuple[str, bool, str], LoadedCollaboration | PolicyError] = {}


def _folder_digest(folder: Path) -> str:
    """Every file of a policy folder, by content: a verdict is reused only for exactly these bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_collaboration(folder: Path, *, approvals: bool = True) -> LoadedCollaboration:
    """Parse and cross-check ``folder``; raise ``PolicyError`` listing every mistake found.

    ``approvals=False`` skips only the approval checks (query hashes and
    protections): `dcr policy approve` loads a policy that is yet to be approved.
    A process loads the same bytes once (parsing YAML with positions is slow; a command loads its policy several times).
    """
    folder = Path(folder)
    key = (str(folder.resolve()), approvals, _folder_digest(folder) if folder.is_dir() else "")
    if key not in _LOADED:
        try:
            _LOADED[key] = _load_collaboration(folder, approvals=approvals)
        except PolicyError as exc:
            _LOADED[key] = exc
    found = _LOADED[key]
    if isinstance(found, PolicyError):
        raise PolicyError(list(found.issues))
    return found


def _load_collaboration(folder: Path, *, approvals: bool = True) -> LoadedCollaboration:
    collab_path = folder / COLLABORATION_FILE
    if not collab_path.is_file():
        raise PolicyError([PolicyIssue(collab_path, None, None, "", "file not found")])
    data, collab_text = _read_yaml(collab_path)
    if not isinstance(data, CommentedMap):
        raise PolicyError([PolicyIssue(collab_path, 1, 1, "", "expected a mapping at the top level")])
    try:
        collab = Collaboration.model_validate(_plain(data))
    except ValidationError as exc:
        raise PolicyError(_validation_issues(exc, collab_path, data)) from None

    issues: list[PolicyIssue] = []

    def issue(where: Sequence[str | int], message: str) -> None:
        line, column = locate(data, where)
        issues.append(PolicyIssue(collab_path, line, column, _dotted(where), message))

    _check_collaboration(collab, folder, issue)
    first_budget: dict[str, int] = {}
    for i, budget in enumerate(collab.budgets):
        if budget.consumer in first_budget:
            at = first_budget[budget.consumer]
            issue(("budgets", i, "consumer"), f"a second budget for {budget.consumer} (the first is budgets[{at}], line {locate(data, ('budgets', at))[0]}); "
                  "a consumer has one budget: keep one entry")
        first_budget.setdefault(budget.consumer, i)

    queries: dict[str, ApprovedQuery] = {}
    queries_dir = folder / QUERIES_DIR
    for spec_path in sorted(queries_dir.glob("*.yaml")) if queries_dir.is_dir() else []:
        try:
            loaded = _load_query(spec_path, collab)
        except PolicyError as exc:
            issues.extend(exc.issues)
            continue
        queries[loaded.name] = loaded

    for query_name in collab.approvals:
        if query_name not in queries:
            issue(("approvals", query_name), f"approval for unknown query {query_name!r}")
    if approvals:
        for loaded in queries.values():
            issues.extend(_approval_issues(loaded, collab, data, collab_path))
        _check_protections(collab, folder, issue)

    if issues:
        raise PolicyError(issues)
    policy_sha = hashlib.sha256(json.dumps([collab_text, sorted(q.sha256 for q in queries.values())]).encode()).hexdigest()
    return LoadedCollaboration(collab, folder, queries, policy_sha)


def _check_collaboration(collab: Collaboration, folder: Path, issue: Any) -> None:
    if collab.name != folder.name:
        issue(("name",), f"collaboration name {collab.name!r} must equal its folder name {folder.name!r}")
    members = collab.members
    for ds_name, ds in collab.datasets.items():
        where = ("datasets", ds_name)
        if ds.owner not in members:
            issue((*where, "owner"), f"unknown member {ds.owner!r} (members: {', '.join(members)})")
        elif Ability.PROVIDE_DATA not in members[ds.owner].abilities:
            issue((*where, "owner"), f"member {ds.owner!r} lacks the provide_data ability")
        for i, col in enumerate(ds.shared or ()):
            if col not in ds.columns:
                issue((*where, "shared", i), f"column {col!r} does not exist in dataset {ds_name!r}")
            elif ds.columns[col].identifier is not None:
                issue((*where, "shared", i), f"identifier column {col!r} cannot be shared; it is tokenised")
        for i, flt in enumerate(ds.row_filters):
            if flt.column not in ds.columns:
                issue((*where, "row_filters", i, "column"), f"column {flt.column!r} does not exist in dataset {ds_name!r}")
        for i, extra in enumerate(ds.expectations):
            problem = _expectation_problem(extra.type, extra.kwargs, ds.columns)
            if problem:
                issue((*where, "expectations", i), problem)
        shared = set(ds.shared_columns)
        for col in ds.columns:
            if col == "match_id" or col.startswith("dcr_"):
                issue((*where, "columns", col), f"column name {col!r} is reserved (match_id and dcr_* are added by the clean room); rename it")
        for col, spec in ds.columns.items():
            if (spec.dimension or spec.aggregate or spec.list) and col not in shared:
                issue((*where, "columns", col), f"column {col!r} has an analysis role (dimension, aggregate or list) but is not in 'shared'")
        rule = ds.analysis_rule
        if rule.type == "list" and not any(c.list for c in ds.columns.values()):
            issue((*where, "analysis_rule", "type"), "a list rule needs at least one column with 'list: true'")
        if rule.ad_hoc and not any(c.join for c in ds.columns.values()):
            issue((*where, "analysis_rule", "type"), f"an {rule.type} rule needs a join column ('join: true' on the identifier column)")
        for col in rule.bounds:
            if col not in ds.columns:
                issue((*where, "analysis_rule", "bounds", col), f"column {col!r} does not exist in dataset {ds_name!r}")
            elif ds.columns[col].type not in (ColumnType.INTEGER, ColumnType.NUMERIC):
                issue((*where, "analysis_rule", "bounds", col), f"bounds are for numeric columns; {col!r} is {ds.columns[col].type.value}")
        if rule.type == "differential_privacy":
            for col, spec in ds.columns.items():
                summed = {AggregateFunction.SUM, AggregateFunction.AVG} & set(spec.aggregate)
                if summed and col not in rule.bounds and spec.range is None:
                    issue((*where, "analysis_rule", "bounds"), f"column {col!r} may be summed or averaged under differential privacy, so it needs "
                          f"bounds: add 'bounds: {{{col}: [low, high]}}' (what one person adds to a group at most) or a 'range' on the column")
        kinds = collab.identity.kinds
        if not any(c.identifier in kinds for c in ds.columns.values()):
            named = " or ".join(repr(k.value) for k in kinds)
            issue((*where, "columns"), f"no column is an identifier of kind {named}, so the dataset cannot be matched")
    parties = {d.owner for d in collab.datasets.values()}
    for member in sorted(collab.members):  # every role the grants make (a longer name would be cut, and two could become one)
        longest = f"dcr_{collab.name}_{member}_staging_loader"
        if len(longest) > 63:
            issue(("members", member), f"role name {longest!r} exceeds PostgreSQL's 63 characters; shorten the collaboration or member name")
    if len(f"dcr_{collab.name}_analysis_builder") > 63:
        issue(("name",), f"role name 'dcr_{collab.name}_analysis_builder' exceeds PostgreSQL's 63 characters; shorten the collaboration name")
    if len(parties) < 2:
        issue(("datasets",), "a collaboration needs datasets from at least two members")
    client = collab.matching.client
    if client is not None and client not in parties:
        issue(("matching", "client"), f"matching client {client!r} is not a member that provides a dataset")
    home = collab.matching.home_parties
    for i, party in enumerate(home):
        if party not in parties:
            issue(("matching", "home_parties", i), f"home party {party!r} is not a member that provides a dataset")
        elif party == client:
            issue(("matching", "home_parties", i), f"{party!r} cannot be both the matching client and a home party: "
                  "the client's half runs at the operator, who completes the match")
    if parties and parties <= set(home):
        issue(("matching", "home_parties"), "at least one party must upload identifiers to the operator and act as the matching client")
    if collab.matching.key_epoch != "run" and (home or collab.matching.bucket_steps):
        issue(("matching", "key_epoch"), "key epochs keep the blinded sets at the operator: they need every party's identifiers there "
              "(no home_parties) and one matching step (bucket_steps: false); use key_epoch: run")
    if len(collab.identity.kinds) > 1:
        for ds_name, ds in collab.datasets.items():
            for kind in collab.identity.kinds:
                same = [col for col, spec in ds.columns.items() if spec.identifier == kind]
                if len(same) > 1:
                    issue(("datasets", ds_name, "columns", same[1]), f"{ds_name} has two {kind.value} identifier columns ({', '.join(same)}); "
                          "several identifiers match on one column of each kind: drop 'identifier' from the others")
        for setting, problem in _graph_unsupported(collab):
            issue(("matching", setting), f"{problem} is not supported with several identifiers yet (identity.{collab.identity.rule}); "
                  f"remove matching.{setting} or match on one identifier (identity.kind)")
    for i, budget in enumerate(collab.budgets):
        if budget.consumer not in members:
            issue(("budgets", i, "consumer"), f"unknown member {budget.consumer!r}")
        elif Ability.RUN_QUERIES not in members[budget.consumer].abilities:
            issue(("budgets", i, "consumer"), f"member {budget.consumer!r} lacks the run_queries ability")
    for query_name, approvals in collab.approvals.items():
        for i, approval in enumerate(approvals):
            if approval.member not in members:
                issue(("approvals", query_name, i, "member"), f"unknown member {approval.member!r}")
    _check_overlap_story(collab, issue)
    for i, schedule in enumerate(collab.schedules):
        problem = _cron_problem(schedule.cron)
        if problem:
            issue(("schedules", i, "cron"), f"{schedule.cron!r} is not a valid five-field cron expression: {problem}")


def _graph_unsupported(collab: Collaboration) -> list[tuple[str, str]]:
    """Matching settings the several-identifier / party-subset matching does not have yet: (setting, what it is)."""
    spec = collab.matching
    found = [("padding", "padding", spec.padding), ("home_parties", "keeping identifiers at home", bool(spec.home_parties)),
             ("key_epoch", "a key epoch", spec.key_epoch != "run"), ("bucket_steps", "one step per bucket", spec.bucket_steps)]
    return [(setting, what) for setting, what, on in found if on]


def _cron_problem(expression: str) -> str | None:
    """Why a schedule's cron expression would not run (checked here so that it cannot take the code location down)."""
    import datetime as dt

    from cronsim import CronSim, CronSimError

    if len(expression.split()) != 5:
        return "it needs minute, hour, day of month, month and day of week"
    try:
        CronSim(expression, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    except CronSimError as exc:
        return str(exc).lower()
    return None


def exact_counters(collab: Collaboration) -> tuple[list[str], list[str]]:
    """(datasets, members): datasets whose ad-hoc rules let those members count the shared people exactly.

    Any aggregation or list rule does: COUNT(DISTINCT join column) of matched rows, or the number of rows of a
    list query, is the overlap (or a part of it) to the person. A differential_privacy rule does not: its counts are noised.
    """
    runners = [m for m, member in collab.members.items() if Ability.RUN_QUERIES in member.abilities and Ability.RECEIVE_RESULTS in member.abilities]
    datasets = [name for name, ds in collab.datasets.items() if ds.analysis_rule.exact] if runners else []
    return datasets, runners if datasets else []


def _check_overlap_story(collab: Collaboration, issue: Any) -> None:
    """The policy tells one story: an overlap members can count exactly is not withheld, nor only released with noise."""
    datasets, runners = exact_counters(collab)
    release = collab.matching.overlap_release
    if datasets and release != "exact":
        issue(
            ("matching", "overlap_release"),
            f"overlap_release: {release} contradicts the analysis rules: {', '.join(datasets)} "
            f"({', '.join(sorted({collab.datasets[d].analysis_rule.type for d in datasets}))} rule) let {', '.join(runners)} count the shared "
            "people exactly with ad-hoc SQL (COUNT(DISTINCT <join column>) over matched rows); set overlap_release: exact, "
            "or put those datasets under a dp or custom rule",
        )


def _expectation_problem(name: str, kwargs: dict[str, Any], columns: dict[str, Any]) -> str | None:
    column = kwargs.get("column")
    if column is not None and column not in columns:
        return f"column {column!r} does not exist"
    return _checked_expectation(name, kwargs)


def _expectation_cache() -> Path | None:
    """The deployment's verdict cache (the default home's too: `dcr query check` does not start the database)."""
    from ..settings import Settings

    return Settings.from_env().home / "cache" / "expectations.json"


def _checked_expectation(name: str, kwargs: dict[str, Any]) -> str | None:
    """great-expectations' own verdict on an expectation and its arguments, remembered per deployment.

    Importing great-expectations costs seconds; every command loads the policy,
    so a verdict is computed once per distinct (expectation, arguments, version).
    """
    from importlib.metadata import version

    key = hashlib.sha256(json.dumps([name, kwargs, version("great-expectations")], sort_keys=True, default=str).encode()).hexdigest()
    path = _expectation_cache()
    cache: dict[str, str | None] = {}
    if path is not None and path.is_file():
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            cache = {}
    if key in cache:
        return cache[key]
    from ..validation import expectation_class

    problem: str | None = None
    try:
        expectation_class(name)(**kwargs)
    except KeyError:
        problem = f"{name!r} is not a great-expectations expectation"
    except Exception as exc:  # great-expectations validates its own arguments
        problem = f"invalid arguments for {name}: {str(exc).splitlines()[0]}"
    if path is not None:
        cache[key] = problem
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        tmp.replace(path)
    return problem


def _load_query(spec_path: Path, collab: Collaboration) -> ApprovedQuery:
    data, spec_text = _read_yaml(spec_path)
    if not isinstance(data, CommentedMap):
        raise PolicyError([PolicyIssue(spec_path, 1, 1, "", "expected a mapping at the top level")])
    try:
        spec = QuerySpec.model_validate(_plain(data))
    except ValidationError as exc:
        raise PolicyError(_validation_issues(exc, spec_path, data)) from None
    name = spec_path.stem
    issues: list[PolicyIssue] = []
    if name in ("ad_hoc", "overlap"):
        raise PolicyError([PolicyIssue(spec_path, None, None, "", f"the query name {name} is reserved (ad-hoc SQL, the overlap release); rename the files")])
    if name in naming.OTHER_LABELS or name.startswith(naming.STAGE_LABELS):
        raise PolicyError([PolicyIssue(spec_path, None, None, "", f"the query name {name} looks like another asset in the lineage graph (names starting "
                                       f"{', '.join(naming.STAGE_LABELS)} and the names {', '.join(naming.OTHER_LABELS)} are taken); rename the files")])

    def issue(where: Sequence[str | int], message: str) -> None:
        line, column = locate(data, where)
        issues.append(PolicyIssue(spec_path, line, column, _dotted(where), message))

    sql_path = sql_path_of(spec_path, spec.sql)
    if not sql_path.is_file():
        issue(("sql",), f"query SQL file {sql_path.name} not found")
        raise PolicyError(issues)
    sql_text = sql_path.read_text(encoding="utf-8")
    markers = template_markers(sql_path, sql_text)
    if markers:
        raise PolicyError([*issues, *markers])

    members = collab.members
    if spec.consumer not in members:
        issue(("consumer",), f"unknown member {spec.consumer!r}")
    elif Ability.RUN_QUERIES not in members[spec.consumer].abilities:
        issue(("consumer",), f"member {spec.consumer!r} lacks the run_queries ability")
    for i, receiver in enumerate(spec.receivers):
        if receiver not in members:
            issue(("receivers", i), f"unknown member {receiver!r}")
        elif Ability.RECEIVE_RESULTS not in members[receiver].abilities:
            issue(("receivers", i), f"member {receiver!r} lacks the receive_results ability")

    datasets, placeholders, columns = _sql_references(sql_text, sql_path, issues)
    for ds in datasets:
        if ds not in collab.datasets:
            line = _line_of(sql_text, ds)
            issues.append(PolicyIssue(sql_path, line, None, "", f"query reads unknown dataset {ds!r} (datasets: {', '.join(collab.datasets)})"))
    owners = {d.owner for d in collab.datasets.values()}
    if spec.parties:
        for i, party in enumerate(spec.parties):
            if party not in owners:
                issue(("parties", i), f"{party!r} is not a party (a member that provides a dataset: {', '.join(sorted(owners))})")
        if len(set(spec.parties)) < 2:
            issue(("parties",), "a query reads the people shared by at least two parties; list two or more (or leave 'parties' out for all)")
        for ds in datasets:
            if ds in collab.datasets and collab.datasets[ds].owner not in spec.parties:
                issue(("parties",), f"the query reads {ds!r} of {collab.datasets[ds].owner!r}, which is not in its parties; add it")
        suffix = "".join(f"__{p}" for p in spec.parties)
        names = [f"cross_reference{suffix}__links"] + [f"matched_{d}{suffix}" for d, ds in collab.datasets.items() if ds.owner in spec.parties]
        for long_name in [n for n in names if len(n) > 63][:1]:
            issue(("parties",), f"the table or view name {long_name!r} exceeds PostgreSQL's 63 characters; shorten the party or dataset names")
        for party in [p for p in spec.parties if "__" in p][:1]:
            issue(("parties",), f"party name {party!r} holds '__', which separates the parties in the names of their tables; rename the member")
        kinds_of = {p: {c.identifier for d in collab.datasets.values() if d.owner == p for c in d.columns.values()
                        if c.identifier in collab.identity.kinds} for p in spec.parties}
        reached, todo = set(), [spec.parties[0]]
        while todo:  # the parties linked to the first through identifier kinds they share
            party = todo.pop()
            reached.add(party)
            todo += [q for q in spec.parties if q not in reached and kinds_of[party] & kinds_of[q]]
        if len(set(spec.parties)) >= 2 and not set(spec.parties) <= reached:
            apart = sorted(set(spec.parties) - reached)
            issue(("parties",), f"{', '.join(apart)} share(s) no identifier kind with {', '.join(sorted(reached))}, so nobody could be matched "
                  "across these parties; add a party that holds both kinds, or a column of a common kind")
        if set(spec.parties) < owners and spec.rule != "dp":
            issue(("rule",), "a query over some of the parties is released with noise (rule: dp): the difference checks that guard "
                  "exact releases recognise a person through the all-party cross-reference only; set rule: dp, or leave 'parties' out")
        if set(spec.parties) < owners:
            for setting, problem in _graph_unsupported(collab):
                issue(("parties",), f"a query over some of the parties needs its own cross-reference, and {problem} (matching.{setting}) "
                      "is not supported for those yet; leave 'parties' out (people in every party) or remove that setting")
    if datasets and all(ds in collab.datasets for ds in datasets) and not issues:
        _compile_query(sql_text, sql_path, collab, issues)
    for ds_name in datasets:
        if ds_name not in collab.datasets:
            continue
        rule = collab.datasets[ds_name].analysis_rule
        if rule.type in ("dp", "differential_privacy") and spec.rule != "dp":
            issue(("rule",), f"query reads {ds_name!r}, whose analysis rule ({rule.type}) allows only differentially private releases; "
                  "set 'rule: dp' (an exact threshold query over it could be turned into a tracker by the runner's own uploads)")
        if spec.rule == "threshold" and spec.min_distinct_units < rule.min_distinct_units:
            issue(("min_distinct_units",), f"{ds_name!r} requires at least {rule.min_distinct_units} distinct units per released row (analysis_rule.min_distinct_units)")
    for placeholder in placeholders:
        if placeholder not in spec.parameters:
            issues.append(PolicyIssue(sql_path, _line_of(sql_text, ":" + placeholder), None, "", f"parameter :{placeholder} is not declared in {spec_path.name}"))
    for param in spec.parameters:
        if param not in placeholders:
            issue(("parameters", param), f"parameter {param!r} is declared but not used in {sql_path.name}")
    for metric_name, metric in spec.metrics.items():
        if metric.column is not None and metric.column not in columns:
            issue(("metrics", metric_name, "column"), f"column {metric.column!r} is not an output column of {sql_path.name}")
    for dim in spec.dimensions:
        if dim not in columns:
            issue(("dimensions", dim), f"dimension {dim!r} is not an output column of {sql_path.name}")
    if "match_id" not in columns:
        issues.append(PolicyIssue(sql_path, None, None, "", "the query must output match_id (the privacy unit) once per row"))
    if any(d.key_selection_delta for d in spec.dimensions.values()) and not any(
        m.aggregate == MetricKind.COUNT_UNITS for m in spec.metrics.values()
    ):
        issue(("dimensions",), "DP key selection needs a count_units metric to threshold on")
    if issues:
        raise PolicyError(issues)
    digest = query_sha256(sql_text, spec_text)
    return ApprovedQuery(name, spec, sql_text, spec_path, sql_path, digest, tuple(datasets), tuple(placeholders))


def sql_path_of(spec_path: Path, sql_field: str | None) -> Path:
    """The SQL file of a query: its YAML's ``sql:`` field, or ``<name>.sql`` beside it."""
    return spec_path.with_name(sql_field or f"{spec_path.stem}.sql")


def query_hash(spec_path: Path) -> str:
    """The SHA-256 owners approve for the query ``spec_path`` describes (what `dcr policy hash` prints and the loader checks)."""
    data, spec_text = _read_yaml(spec_path)
    field = data.get("sql") if isinstance(data, CommentedMap) else None
    sql_path = sql_path_of(spec_path, str(field) if field else None)
    sql_text = sql_path.read_text(encoding="utf-8") if sql_path.is_file() else ""
    return query_sha256(sql_text, spec_text)


def _line_of(text: str, needle: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return None


def _sql_references(sql_text: str, sql_path: Path, issues: list[PolicyIssue]) -> tuple[list[str], list[str], list[str]]:
    """Datasets read, ``:parameters`` used and output column names of an approved query."""
    try:
        statements = [s for s in sqlglot.parse(sql_text, read="postgres") if s is not None]
    except sqlglot.errors.ParseError as exc:
        err = exc.errors[0] if exc.errors else {}
        issues.append(PolicyIssue(sql_path, err.get("line"), err.get("col"), "", f"SQL does not parse: {err.get('description', exc)}"))
        return [], [], []
    if len(statements) != 1 or not isinstance(statements[0], sqlglot.exp.Query):
        issues.append(PolicyIssue(sql_path, 1, 1, "", "an approved query is exactly one SELECT statement"))
        return [], [], []
    tree = statements[0]
    ctes = {cte.alias_or_name for cte in tree.find_all(sqlglot.exp.CTE)}
    datasets: list[str] = []
    for table in tree.find_all(sqlglot.exp.Table):
        if table.name not in ctes and table.name not in datasets:
            if table.db:
                issues.append(PolicyIssue(sql_path, _line_of(sql_text, table.db + "."), None, "", f"refer to datasets by their logical name, not {table.sql()!r}"))
            datasets.append(table.name)
    placeholders: list[str] = []
    for node in tree.find_all(sqlglot.exp.Placeholder):
        if node.name and node.name not in placeholders:
            placeholders.append(node.name)
    columns = list(tree.named_selects)
    return datasets, placeholders, columns


_SQL_TYPES = {ColumnType.TEXT: "text", ColumnType.INTEGER: "bigint", ColumnType.NUMERIC: "numeric", ColumnType.DATE: "date",
              ColumnType.TIMESTAMP: "timestamp", ColumnType.BOOLEAN: "boolean"}


_PLATFORM_FUNCTIONS = frozenset({"keyed_token", "current_setting", "set_config", "current_user", "session_user", "dblink", "lo_import", "lo_export"})


def _compile_query(sql_text: str, sql_path: Path, collab: Collaboration, issues: list[PolicyIssue]) -> None:
    """Resolve every column of an approved query against the columns its datasets show it (the shared columns and
    match_id), as the database will: a typo is found here, with its line, column and the nearest name, not at release."""
    import difflib

    from sqlglot.errors import OptimizeError
    from sqlglot.optimizer.qualify import qualify

    tree = sqlglot.parse_one(sql_text, read="postgres")
    # An approved query reads its datasets and calls SQL's functions; nothing of the platform (the token function, session
    # settings, server files, the operator's tables) even if a reviewer let it through.
    for part in tree.walk():
        what = None
        if isinstance(part, sqlglot.exp.Dot) and isinstance(part.expression, sqlglot.exp.Func):
            what = f"the schema-qualified function {part.sql(dialect='postgres')!r}: approved queries call SQL's own functions only"
        elif isinstance(part, sqlglot.exp.Anonymous) and (str(part.name).lower() in _PLATFORM_FUNCTIONS or str(part.name).lower().startswith("pg_")):
            what = f"function {str(part.name).lower()}(): it reads the platform (keys, settings, server files), not the datasets"
        elif isinstance(part, sqlglot.exp.Table) and (part.args.get("db") is not None or part.args.get("catalog") is not None):
            what = f"table {part.sql(dialect='postgres')!r}: approved queries read their datasets by name, never a schema of the platform"
        if what is not None:
            issues.append(PolicyIssue(sql_path, None, None, "", f"the query uses {what}"))
            return
    schema: dict[str, object] = {name: {"match_id": "text", **{c: _SQL_TYPES[ds.columns[c].type] for c in ds.shared_columns if c in ds.columns}}
              for name, ds in collab.datasets.items()}
    try:
        qualify(tree.copy(), schema=schema, dialect="postgres", validate_qualify_columns=True)
    except (OptimizeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        message = str(exc)
        named = re.match(r"Unknown column: (\S+)|Column '([^']+)' could not be resolved", message)
        unknown = (named.group(1) or named.group(2)) if named else None
        node = next((c for c in tree.find_all(sqlglot.exp.Column) if unknown is not None and c.name == unknown), None)
        line = column = None
        if node is not None and node.this.meta.get("start") is not None:
            start = int(node.this.meta["start"])
            line = sql_text.count("\n", 0, start) + 1
            column = start - (sql_text.rfind("\n", 0, start) + 1) + 1
        if unknown is not None:
            ctes = {name for cte in tree.find_all(sqlglot.exp.CTE) for name in cte.this.named_selects}
            known = sorted(({c for cols in schema.values() for c in cols} | ctes) - {unknown})  # type: ignore[attr-defined]
            near = difflib.get_close_matches(unknown, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (the datasets show {', '.join(known)})"
            issues.append(PolicyIssue(sql_path, line, column, "", f"column {unknown!r} does not exist in the datasets this query reads{hint}"))
        else:
            issues.append(PolicyIssue(sql_path, None, None, "", f"the query does not resolve against its datasets' columns: {message}"))


def discover(root: Path) -> list[Path]:
    """Every collaboration folder under ``root`` (a folder with a collaboration.yaml)."""
    root = Path(root)
    if (root / COLLABORATION_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{COLLABORATION_FILE}"))


def check_policies(root: Path) -> tuple[list[LoadedCollaboration], list[PolicyIssue]]:
    """Load every collaboration under ``root``; return the good ones and all issues found."""
    loaded: list[LoadedCollaboration] = []
    issues: list[PolicyIssue] = []
    folders = discover(root)
    if not folders:
        issues.append(PolicyIssue(Path(root), None, None, "", f"no {COLLABORATION_FILE} found"))
    for folder in folders:
        try:
            loaded.append(load_collaboration(folder))
        except PolicyError as exc:
            issues.extend(exc.issues)
    return loaded, issues


def approvers(collab: Collaboration) -> list[str]:
    """Who approves every query: each party, i.e. each member whose data a query reads or whose identities feed the
    cross-reference it joins through (which is every member that provides data: the overlap is everyone's)."""
    owners = {ds.owner for ds in collab.datasets.values()}
    return [m for m in collab.members if m in owners]


def _check_protections(collab: Collaboration, folder: Path, issue: Any) -> None:
    """Each party approved what protects its data; a change that loosens it needs a new approval, tightening does not."""
    from . import protections

    owners = approvers(collab)
    # A member that approved protections once is asked again even if it no longer provides data: moving its dataset
    # to another owner must not bypass it.
    former = [m for m in collab.members if m not in owners and protections.snapshot_path(folder, m).is_file()]
    for party in [*owners, *former]:
        path = protections.snapshot_path(folder, party)
        command = f"dcr policy approve {collab.name} --member {party}"
        current = protections.document(collab, party)
        if not path.is_file():
            issue(("members", party), f"{party} has not approved what protects its data ({protections.FOLDER}/{party}.json is missing); "
                  f"{party} runs `{command}`")
            continue
        try:
            approved = json.loads(path.read_text(encoding="utf-8"))["approved"]
            if approved.get("party") != party:
                raise ValueError(f"it is {approved.get('party')!r}'s")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            issue(("members", party), f"{protections.FOLDER}/{party}.json is not an approval written by `{command}` ({exc})")
            continue
        if protections.digest(approved) == protections.digest(current):
            continue
        for where, what in protections.loosened(approved, current, collab):
            issue(where, f"loosens what {party} approved: {what}; {party} must approve the new protections "
                  f"(sha256 {protections.digest(current)[:12]}...): `{command}`")


def _approval_issues(query: ApprovedQuery, collab: Collaboration, data: Any, collab_path: Path) -> list[PolicyIssue]:
    """Every party must have approved exactly this hash (see ``approvers``)."""
    owners = approvers(collab)
    approved = {a.member: a.sha256 for a in collab.approvals.get(query.name, ())}
    issues = []
    for owner in owners:
        if owner not in approved:
            line, column = locate(data, ("approvals", query.name)) if query.name in collab.approvals else locate(data, ("approvals",))
            reads = owner in {collab.datasets[d].owner for d in query.datasets if d in collab.datasets}
            why = f"reads {owner}'s data" if reads else f"joins through the cross-reference, which {owner}'s identities feed"
            issues.append(PolicyIssue(collab_path, line, column, f"approvals.{query.name}",
                                      f"query {query.name!r} {why} but {owner} has not approved it; approve sha256 {query.sha256} "
                                      f"(`dcr policy approve {collab.name} --member {owner}`)"))
        elif approved[owner] != query.sha256:
            index = [a.member for a in collab.approvals[query.name]].index(owner)
            line, column = locate(data, ("approvals", query.name, index, "sha256"))
            issues.append(PolicyIssue(collab_path, line, column, f"approvals.{query.name}[{index}].sha256", f"query {query.name!r} changed since {owner} approved sha256 {approved[owner][:12]}...; {owner} must re-approve sha256 {query.sha256}"))
    return issues
