"""Ad-hoc SQL under the owners' analysis rules: check it, then plan an evaluation that cannot leak through errors.

An analyst writes one SELECT over the collaboration's logical dataset names,
joining on the declared join columns, e.g.::

    select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers
    from impressions as i inner join customers as c on c.customer_email = i.user_email
    group by i.campaign_id, c.loyalty_tier

``check`` parses it with sqlglot and validates every node against the rules
of every dataset it reads (the most restrictive setting wins across
datasets). Anything not explicitly allowed is refused, naming the rule and
the offending part.

The accepted query is then split in two (``CheckedQuery.phase1`` and
``CheckedQuery.phase2``), because whatever the database evaluates before
the threshold filter must not be able to fail on any data: an error raised
while a one-person group is computed would tell the analyst something about
that person (the overflow oracle).

- **Phase 1** runs over the matched views and computes, per group, only the
  group keys and plain aggregates of typed column expressions drawn from a
  small *total* grammar (comparisons with typed literals, a fixed set of
  functions with validated literal arguments, no arithmetic), then keeps the
  groups with at least the threshold's number of distinct people. Every
  expression of that grammar is defined for every value of its column types,
  so phase 1 either fails for every database (a type or literal error found
  while PostgreSQL plans the statement) or for none.
- **Phase 2** evaluates the analyst's own expressions (arithmetic, rounding,
  HAVING, ORDER BY, LIMIT) over the surviving groups only, so its errors can
  depend only on groups that passed the threshold (and the difference check).

Names are resolved the way PostgreSQL does: every column is qualified with
its table alias, GROUP BY and ORDER BY names that could mean both an output
column and an input column are refused, HAVING reads input columns only.
The statements that run are regenerated from the checked tree, never from
the analyst's text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from .. import naming
from ..policy import LoadedCollaboration
from ..policy.models import Ability, AggregateFunction, Column, ColumnType, Dataset
from ..privacy.contribution import DpAggregate, DpQuery

UNITS = "dcr_units"
PEOPLE = "dcr_people"
ROW = "dcr_row"
UNIT_COLUMN = "dcr_unit"  # the stable person number in every matched view (see matching)
ROW_COLUMN = "dcr_row"  # the staged row a matched-view row comes from (exact mode reads each source row once)
HIDDEN_VIEW_COLUMNS = ("match_id", UNIT_COLUMN, ROW_COLUMN)

# Parsed forms of each scalar function an owner can allow (policy names: models.SCALAR_FUNCTIONS).
SCALAR_FORMS: dict[type[exp.Expr], str] = {
    exp.Lower: "lower", exp.Upper: "upper", exp.Trim: "trim", exp.Length: "length", exp.Substring: "substring",
    exp.Concat: "concat", exp.DPipe: "concat", exp.Round: "round", exp.Abs: "abs", exp.Floor: "floor", exp.Ceil: "ceil",
    exp.Coalesce: "coalesce", exp.Greatest: "greatest", exp.Least: "least", exp.TimestampTrunc: "date_trunc",
    exp.DateTrunc: "date_trunc", exp.Extract: "extract", exp.Cast: "cast", exp.Case: "case", exp.If: "case",
}
AGGREGATES: dict[type[exp.Expr], str] = {
    exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max", exp.Stddev: "stddev", exp.Variance: "variance",
}
# Functions applied to released aggregates only (phase 2): any runner may use them there, no owner allow-list needed.
POST_FUNCTIONS: dict[type[exp.Expr], str] = {
    exp.Sqrt: "sqrt", exp.Ln: "ln", exp.Log: "log", exp.Trunc: "trunc", exp.TimeToStr: "to_char", exp.Extract: "extract",
    exp.Round: "round", exp.Abs: "abs", exp.Floor: "floor", exp.Ceil: "ceil", exp.Coalesce: "coalesce", exp.Greatest: "greatest",
    exp.Least: "least", exp.Cast: "cast",
}
# Syntax that carries no data access of its own: operators, literals, names.
NEUTRAL = (
    exp.Select, exp.From, exp.Join, exp.Where, exp.Group, exp.Having, exp.Order, exp.Ordered, exp.Limit, exp.Offset,
    exp.Table, exp.TableAlias, exp.Alias, exp.Identifier, exp.Column, exp.Literal, exp.Boolean, exp.Null, exp.Paren,
    exp.Neg, exp.Not, exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Is, exp.In, exp.Between,
    exp.Like, exp.ILike, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Distinct, exp.DataType, exp.Var, exp.Star,
    exp.Interval,
)
CATALOG_PREFIXES = ("pg_", "information_schema")
SETTINGS_FUNCTIONS = ("current_setting", "set_config", "current_user", "session_user", "version", "inet_server_addr")
ALLOWED_WHITESPACE = {" ", "\t", "\n", "\r"}

PRE_THRESHOLD = "pre-threshold evaluation"
# date_trunc units and extract fields PostgreSQL accepts for each type; anything else would fail on the first row.
TRUNC_UNITS = frozenset({"microseconds", "milliseconds", "second", "minute", "hour", "day", "week", "month", "quarter", "year", "decade", "century", "millennium"})
DATE_FIELDS = frozenset({"century", "day", "decade", "dow", "doy", "epoch", "isodow", "isoyear", "julian", "millennium", "month", "quarter", "week", "year"})
TIMESTAMP_FIELDS = DATE_FIELDS | {"hour", "minute", "second", "milliseconds", "microseconds"}
ROUND_DIGITS = 1000


class QueryRefused(Exception):
    """The query breaks a rule; ``rule`` names it, the message names the offending part."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"{message} ({rule})")


@dataclass(frozen=True)
class TableUse:
    alias: str
    dataset: str
    owner: str
    rule: str


@dataclass(frozen=True)
class CheckedQuery:
    """An accepted query and its two-phase evaluation plan.

    ``phase1`` outputs one row per group that has at least ``min_distinct_units``
    distinct people: keys ``k1..``, plain aggregates ``a1..``, the number of
    people (``dcr_units``) and, if asked, their sorted unit numbers
    (``dcr_people``). ``phase2(types)`` is the analyst's own expressions over
    the rows that survive, fed back as arrays of those types.
    """

    runner: str
    kind: str  # "aggregation" or "list"
    tables: tuple[TableUse, ...]
    min_distinct_units: int
    threshold_from: str | None
    columns: tuple[str, ...]
    phase1: str
    keys: int
    aggregates: int
    outputs: tuple[str, ...]
    having: str | None = None
    order: tuple[str, ...] = ()
    limit: int | None = None
    offset: int | None = None
    rules: tuple[str, ...] = field(default=())
    phase1_without_people: str = ""
    dp: DpQuery | None = None  # set when a dataset read is under the differential_privacy rule: the answer is noised

    @property
    def mode(self) -> str:
        """``dp`` (noised, charged to the runner's budget) or ``exact`` (thresholded, per person first)."""
        return "dp" if self.dp is not None else "exact"

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.dataset for t in self.tables))

    @property
    def input_names(self) -> tuple[str, ...]:
        """Columns of the rows ``phase2`` reads, in order: the row number, the keys, the aggregates."""
        return (ROW, *(f"k{i}" for i in range(1, self.keys + 1)), *(f"a{j}" for j in range(1, self.aggregates + 1)))

    def phase2(self, types: Sequence[str]) -> str:
        """The analyst's expressions over the surviving groups, read from one array parameter per input column."""
        if len(types) != len(self.input_names):
            raise ValueError(f"phase 2 takes {len(self.input_names)} array types, got {len(types)}")
        for t in types:
            if not re.fullmatch(r"[a-z][a-z0-9_ ]*", t):
                raise ValueError(f"not a type name: {t!r}")
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        columns = ", ".join(f'"{n}"' for n in self.input_names)
        items = ", ".join(f'{expression} as "{name}"' for expression, name in zip(self.outputs, self.columns, strict=False))
        inner = f'select {items}, "g"."{ROW}" as "{ROW}" from unnest({arrays}) as "g"({columns})'
        if self.having:
            inner += f" where {self.having}"
        sql_text = f'select * from ({inner}) as "dcr_out"'
        if self.order:
            sql_text += " order by " + ", ".join(self.order)
        if self.limit is not None:
            sql_text += f" limit {self.limit}"
        if self.offset is not None:
            sql_text += f" offset {self.offset}"
        return sql_text

    def _unnest(self, types: Sequence[str]) -> str:
        if len(types) != len(self.input_names):
            raise ValueError(f"phase 2 takes {len(self.input_names)} array types, got {len(types)}")
        for t in types:
            if not re.fullmatch(r"[a-z][a-z0-9_ ]*", t):
                raise ValueError(f"not a type name: {t!r}")
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        return f'unnest({arrays}) as "g"({", ".join(chr(34) + n + chr(34) for n in self.input_names)})'

    def select_one(self, types: Sequence[str], expression: str) -> str:
        """One phase-2 expression (an output or HAVING) over one group, fed as one-element arrays."""
        return f"select {expression} from {self._unnest(types)}"

    def ordered(self, types: Sequence[str]) -> str:
        """ORDER BY, LIMIT and OFFSET over outputs already computed: the group number, then one array per output."""
        if len(types) != len(self.columns) + 1:
            raise ValueError(f"ordering takes {len(self.columns) + 1} array types, got {len(types)}")
        for t in types:
            if not re.fullmatch(r"[a-z][a-z0-9_ ]*", t):
                raise ValueError(f"not a type name: {t!r}")
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        names = ", ".join(f'"{n}"' for n in (ROW, *self.columns))
        sql_text = f'select * from unnest({arrays}) as "dcr_out"({names})'
        if self.order:
            sql_text += " order by " + ", ".join(self.order)
        if self.limit is not None:
            sql_text += f" limit {self.limit}"
        if self.offset is not None:
            sql_text += f" offset {self.offset}"
        return sql_text

    @property
    def sql(self) -> str:
        """Both statements, for reading (phase 2 with generic array types)."""
        return self.phase1 + ";\n-- then, over the groups that passed the threshold:\n" + self.phase2(["bigint"] + ["anyelement"] * (len(self.input_names) - 1)).replace("anyelement", "...")

    def summary(self) -> list[str]:
        lines = [f"tables: {', '.join(f'{t.dataset} ({t.owner}, {t.rule} rule)' for t in self.tables)}"]
        lines += [f"rule: {r}" for r in self.rules]
        if self.dp is not None:
            dp = self.dp
            lines.append(f"mode: differential privacy; costs epsilon {dp.epsilon:g}" + (f" and delta {dp.key_selection_delta:g}" if dp.key_selection else "")
                         + f" of {self.runner}'s budget (an identical query over the same data is answered from the store, free)")
            lines.append(f"contribution: each person counts in at most {dp.max_groups} group(s) and at most {dp.max_rows} row(s) per group"
                         + "".join(f"; {a.label} clamped to [{a.lower:g}, {a.upper:g}] per person" for a in dp.aggregates if a.function in ("sum", "avg")))
            lines.append(f"groups: every combination of the keys' public domains ({dp.cells})" if dp.domains is not None
                         else "groups: released only if their noised count of people clears opendp's threshold (key selection)")
            if dp.min_people:
                lines.append(f"threshold: groups whose noised count of people is under {dp.min_people} are dropped (from {self.threshold_from})")
        else:
            lines.append("mode: exact (thresholded, not differentially private); each person counts once per group")
            if self.min_distinct_units:
                lines.append(f"threshold: rows with fewer than {self.min_distinct_units} distinct people are removed (from {self.threshold_from})")
        lines.append(f"output columns: {', '.join(self.columns)}")
        return lines


def _part(node: exp.Expr) -> str:
    text = node.sql(dialect="postgres")
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class _Context:
    loaded: LoadedCollaboration
    runner: str
    tables: dict[str, TableUse] = field(default_factory=dict)

    def dataset(self, alias: str) -> Dataset:
        return self.loaded.collaboration.datasets[self.tables[alias].dataset]


MAX_QUERY_CHARS = 100_000
MAX_DEPTH = 64  # nesting of expressions; a deeper query is refused before the parser recurses into it


def check(loaded: LoadedCollaboration, runner: str, text: str) -> CheckedQuery:
    """Validate ``text`` as ``runner`` against every rule; return its evaluation plan, or raise ``QueryRefused``."""
    _check_member(loaded, runner)
    try:
        return _check(loaded, runner, text)
    except RecursionError:
        raise QueryRefused("syntax", f"the query nests more deeply than {MAX_DEPTH} levels; write it flatter") from None


def _check(loaded: LoadedCollaboration, runner: str, text: str) -> CheckedQuery:
    if len(text) > MAX_QUERY_CHARS:
        raise QueryRefused("query text", f"the query is {len(text):,} characters long, more than {MAX_QUERY_CHARS:,}")
    depth = deepest = 0
    for ch in text:  # parentheses are the only nesting a SELECT can have this deep; strings count too (conservative)
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise QueryRefused("syntax", f"the query nests more deeply than {MAX_DEPTH} levels of parentheses; write it flatter")
    tree = _parse(text)
    ctx = _Context(loaded, runner)
    _check_structure(tree)
    _check_tables(ctx, tree)
    rules = _rules(ctx)
    _check_nodes(ctx, tree, rules)
    _check_joins(ctx, tree, rules)
    names = _output_names(tree)
    kind = "list" if tree.args.get("distinct") else "aggregation"
    order = _resolve_order(ctx, tree, names)
    _resolve_group(ctx, tree, names)
    _check_having(ctx, tree, names)
    _qualify(ctx, tree)
    _check_columns(ctx, tree)
    if kind == "list":
        _check_list_shape(ctx, tree)
    elif not any(_has_aggregate(e) for e in tree.expressions):
        raise QueryRefused("aggregation rule", "the query outputs no aggregate: every output row must aggregate people (COUNT, SUM, AVG, ...)")
    threshold, source = 0, None
    for use in ctx.tables.values():
        units = ctx.loaded.collaboration.datasets[use.dataset].analysis_rule.min_distinct_units
        if units > threshold:
            threshold, source = units, f"the analysis rule of {use.dataset}"
    return _plan(ctx, tree, kind, names, order, threshold, source, tuple(rules["described"]))


# --- parsing -------------------------------------------------------------------


def _check_member(loaded: LoadedCollaboration, runner: str) -> None:
    members = loaded.collaboration.members
    if runner not in members:
        raise QueryRefused("members", f"{runner!r} is not a member of {loaded.name} (members: {', '.join(members)})")
    abilities = members[runner].abilities
    if Ability.RUN_QUERIES not in abilities:
        raise QueryRefused("member abilities", f"member {runner} may not run queries: it lacks the run_queries ability")
    if Ability.RECEIVE_RESULTS not in abilities:
        raise QueryRefused("member abilities", f"member {runner} may not receive results: it lacks the receive_results ability")


def _parse(text: str) -> exp.Select:
    for ch in text:
        if ch in ALLOWED_WHITESPACE:
            continue
        category = unicodedata.category(ch)
        if category[0] in ("C", "Z") and ch != " ":
            raise QueryRefused("query text", f"character U+{ord(ch):04X} ({unicodedata.name(ch, 'control')}) is not allowed: invisible characters can change what a query means")
    try:
        tokens = sqlglot.tokenize(text, read="postgres")
        statements = [s for s in sqlglot.parse(text, read="postgres") if s is not None]
    except (ParseError, TokenError) as exc:
        detail = exc.errors[0] if isinstance(exc, ParseError) and exc.errors else {}
        where = f" at line {detail['line']}, column {detail['col']}" if detail.get("line") else ""
        message = detail.get("description") if detail else str(exc).splitlines()[0]
        raise QueryRefused("syntax", f"the query does not parse{where}: {message}") from None
    if any(token.comments for token in tokens):
        raise QueryRefused("query text", "comments are not allowed: they can hide or change what a query means")
    if len(statements) != 1:
        raise QueryRefused("single SELECT", f"exactly one statement is allowed, found {len(statements)}")
    tree = statements[0]
    if isinstance(tree, exp.SetOperation):
        raise QueryRefused("set operations", f"{type(tree).__name__.upper()} is not allowed: it would combine rows past the threshold")
    if not isinstance(tree, exp.Select):
        raise QueryRefused("single SELECT", f"only a SELECT is allowed, not {_part(tree).split()[0].upper() if _part(tree) else type(tree).__name__}")
    if tree.args.get("with"):
        raise QueryRefused("subqueries", "WITH (common table expressions) is not allowed: write one SELECT over the datasets")
    for key in ("into", "locks", "kind", "laterals", "qualify", "windows", "connect", "sample", "settings", "options"):
        if tree.args.get(key):
            raise QueryRefused("single SELECT", f"SELECT ... {key.upper()} is not allowed")
    tree = normalize_identifiers(tree, dialect="postgres")
    assert isinstance(tree, exp.Select)
    return tree


# --- tables and rules ----------------------------------------------------------


def _check_structure(tree: exp.Select) -> None:
    """What no rule allows, checked before anything else: nested queries, windows, parameters, SELECT *."""
    for node in tree.walk():
        if node is not tree and isinstance(node, (exp.Select, exp.Subquery)):
            raise QueryRefused("subqueries", f"subquery {_part(node)} is not allowed: read the datasets directly")
        if isinstance(node, exp.Window):
            raise QueryRefused("window functions", f"window function {_part(node)} is not allowed: it computes over rows the threshold never sees")
        if isinstance(node, (exp.Placeholder, exp.Parameter)):
            raise QueryRefused("parameters", f"{_part(node)}: ad-hoc queries take literal values, not parameters")
        if isinstance(node, exp.Star) and not isinstance(node.parent, exp.Count):
            raise QueryRefused("select *", "SELECT * is not allowed: name the dimensions and aggregates to output")


def _check_tables(ctx: _Context, tree: exp.Select) -> None:
    collab = ctx.loaded.collaboration
    sources: list[exp.Expr] = []
    from_ = tree.args.get("from") or tree.args.get("from_")
    if from_ is None:
        raise QueryRefused("single SELECT", "the query reads no dataset (FROM is missing)")
    sources.append(from_.this)
    if from_.expressions:
        raise QueryRefused("joins", "comma joins are not allowed: use INNER JOIN ... ON the join columns")
    for join in tree.args.get("joins") or []:
        sources.append(join.this)
    for source in sources:
        if isinstance(source, exp.Subquery) or source.find(exp.Select):
            raise QueryRefused("subqueries", f"subquery {_part(source)} is not allowed: read the datasets directly")
        if not isinstance(source, exp.Table) or not isinstance(source.this, exp.Identifier):
            raise QueryRefused("tables", f"{_part(source)} is not a dataset of {ctx.loaded.name}")
        name, schema = source.name, source.db
        if schema or source.catalog or name.startswith(CATALOG_PREFIXES):
            if name.startswith(CATALOG_PREFIXES) or schema in ("pg_catalog", "information_schema") or schema.startswith("pg_"):
                raise QueryRefused("system catalogs", f"{_part(source)} is a system catalog; only the collaboration's datasets can be read")
            raise QueryRefused("tables", f"refer to datasets by their logical name, not {_part(source)}")
        if name not in collab.datasets:
            raise QueryRefused("tables", f"{name} is not a dataset of {ctx.loaded.name} (datasets: {', '.join(collab.datasets)})")
        alias = source.alias or name
        if alias in ctx.tables:
            raise QueryRefused("tables", f"alias {alias} is used twice; give each dataset its own alias")
        if any(use.dataset == name for use in ctx.tables.values()):
            raise QueryRefused("joins", f"dataset {name} is read twice: a self-join multiplies one person's rows, and with them how long "
                                        "the query runs, which would tell whether that person is matched; read each dataset once")
        ds = collab.datasets[name]
        rule = ds.analysis_rule
        if rule.type == "custom":
            raise QueryRefused("custom rule", f"dataset {name} can be queried only through approved queries (custom rule); see `dcr release`")
        if rule.type == "dp":
            raise QueryRefused("dp rule", f"dataset {name} releases only differentially private results of approved queries (dp rule); see `dcr release`")
        ctx.tables[alias] = TableUse(alias, name, ds.owner, rule.type)
    kind = "list" if tree.args.get("distinct") else "aggregation"
    for use in ctx.tables.values():
        if use.rule == kind or (kind == "list" and use.rule == "aggregation" and use.owner == ctx.runner):
            continue  # a list query may join (not output) the runner's own aggregation-rule tables
        if use.rule == "differential_privacy":
            if kind == "list":
                raise QueryRefused("differential_privacy rule", f"dataset {use.dataset} answers only aggregates with noise: SELECT DISTINCT lists row values")
            continue
        if use.rule == "list":
            raise QueryRefused("list rule", f"dataset {use.dataset} answers only SELECT DISTINCT of its list columns")
        raise QueryRefused("aggregation rule", f"dataset {use.dataset} answers only aggregates: SELECT DISTINCT lists row values (list rule only)")
    runner_tables = [t for t in ctx.tables.values() if t.owner == ctx.runner]
    for use in ctx.tables.values():
        rule = collab.datasets[use.dataset].analysis_rule
        required = rule.join_required or rule.type == "list"
        if required and use.owner != ctx.runner and not runner_tables:
            raise QueryRefused(
                f"{rule.type} rule, join_required",
                f"table {use.dataset} requires an inner join with a table of the query runner ({ctx.runner})",
            )


def _rules(ctx: _Context) -> dict[str, set[str] | list[str]]:
    """The most restrictive combination of the rules of every dataset read."""
    collab = ctx.loaded.collaboration
    functions: set[str] | None = None
    operators: set[str] | None = None
    described: list[str] = []
    for use in ctx.tables.values():
        rule = collab.datasets[use.dataset].analysis_rule
        functions = set(rule.scalar_functions) if functions is None else functions & set(rule.scalar_functions)
        operators = set(rule.join_operators) if operators is None else operators & set(rule.join_operators)
        parts = [f"{use.dataset}: {rule.type}"]
        if rule.min_distinct_units:
            parts.append(f"min_distinct_units {rule.min_distinct_units}")
        if rule.join_required or rule.type == "list":
            parts.append("join_required")
        parts.append("scalar functions " + (", ".join(rule.scalar_functions) or "none"))
        parts.append("join operators " + ", ".join(rule.join_operators))
        described.append("; ".join(parts))
    return {"functions": functions or set(), "operators": operators or set(), "described": described}


# --- node-level checks ---------------------------------------------------------


def sql_name(node: exp.Expr) -> str:
    """A function's name as the analyst wrote it in SQL (TO_CHAR, not sqlglot's TimeToStr)."""
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    text = node.sql(dialect="postgres")
    head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text)
    return head.group(0).lower() if head and "(" in text[: head.end() + 1] else type(node).__name__.lower()


def _post_aggregation(node: exp.Expr) -> bool:
    """Whether ``node`` reads released aggregates only: every column under it is inside an aggregate under it."""
    if _aggregate_of(node) is not None or not _has_aggregate(node):
        return False
    inside = set(node.walk())
    return all(_aggregate_of(column) in inside for column in node.find_all(exp.Column))


def _check_nodes(ctx: _Context, tree: exp.Select, rules: dict[str, set[str] | list[str]]) -> None:
    functions = rules["functions"]
    for node in tree.walk():
        if type(node) in POST_FUNCTIONS and _post_aggregation(node):
            continue  # sqrt(sum(x)), to_char(min(d), 'YYYY'): runs over released values only (phase 2)
        if isinstance(node, (exp.Div, exp.Mod)) and not _has_aggregate(node):
            divisor = node.expression
            if not (isinstance(divisor, exp.Literal) and divisor.is_number and float(divisor.this) != 0):
                raise QueryRefused("arithmetic", f"{_part(node)}: divide only by a non-zero number, or divide aggregates (that runs after the threshold)")
        if type(node) in AGGREGATES and any(type(inner) in AGGREGATES for inner in node.walk() if inner is not node):
            raise QueryRefused("aggregation rule", f"{_part(node)}: aggregates cannot be nested")
        if isinstance(node, NEUTRAL):
            continue
        if isinstance(node, exp.Anonymous) or (isinstance(node, exp.Func) and type(node) not in SCALAR_FORMS and type(node) not in AGGREGATES):
            name = sql_name(node)
            if name.startswith(("pg_", "current_")) or name in SETTINGS_FUNCTIONS or "setting" in name:
                raise QueryRefused("system catalogs and settings", f"function {name} reads the server's state and is not allowed")
            if type(node) in POST_FUNCTIONS:
                raise QueryRefused("scalar functions", f"{name} applies to aggregates only, e.g. {name}(sum(x)), not to row values ({_part(node)})")
            raise QueryRefused("scalar functions", f"function {name} is not allowed ({_part(node)})")
        if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal):
            continue  # a typed literal (date '2026-01-01'): no data is read or converted
        if type(node) in SCALAR_FORMS:
            name = SCALAR_FORMS[type(node)]
            if name not in functions:
                allowed = ", ".join(sorted(functions)) or "none"
                raise QueryRefused("aggregation rule, scalar_functions", f"function {name} is not on the allow-list of the datasets read ({_part(node)}; allowed: {allowed})")
            continue
        if type(node) in AGGREGATES:
            continue
        if not isinstance(node, NEUTRAL):
            raise QueryRefused("syntax", f"{sql_name(node).upper()} is not allowed ({_part(node)})")


def _input_columns(ctx: _Context) -> dict[str, list[str]]:
    """Every name an input column could have (declared, hidden or added by the matched views) -> aliases that have it."""
    out: dict[str, list[str]] = {}
    for alias in ctx.tables:
        for name in (*ctx.dataset(alias).columns, *HIDDEN_VIEW_COLUMNS):
            out.setdefault(name, []).append(alias)
    return out


def _resolve(ctx: _Context, column: exp.Column) -> tuple[str, str, Column]:
    """(alias, column name, its policy spec) of an input column, or a refusal naming why it cannot be read."""
    name = column.name
    if column.table:
        if column.table not in ctx.tables:
            raise QueryRefused("tables", f"{column.table} in {_part(column)} is not a dataset or alias of this query")
        candidates = [column.table]
    else:
        candidates = [a for a in ctx.tables if name in ctx.dataset(a).columns or name in HIDDEN_VIEW_COLUMNS]
        if len(candidates) > 1:
            raise QueryRefused("columns", f"column {name} is ambiguous (in {', '.join(ctx.tables[a].dataset for a in candidates)}); qualify it")
        if not candidates:
            raise QueryRefused("columns", f"column {name} does not exist in {', '.join(t.dataset for t in ctx.tables.values())}")
    alias = candidates[0]
    ds = ctx.dataset(alias)
    if name not in ds.columns:
        raise QueryRefused("columns", f"column {name} does not exist in {ctx.tables[alias].dataset}")
    spec = ds.columns[name]
    if spec.identifier is None and name not in ds.shared_columns:
        raise QueryRefused("columns", f"column {name} of {ctx.tables[alias].dataset} is not shared by its owner")
    return alias, name, spec


def _is_bare_name(node: exp.Expr) -> bool:
    return isinstance(node, exp.Column) and not node.table


def _output_expression(tree: exp.Select, names: list[str], name: str) -> exp.Expr:
    return tree.expressions[names.index(name)].unalias()


def _same_as_input(ctx: _Context, item: exp.Expr, name: str) -> bool:
    """Whether an output expression is the input column ``name`` itself (then alias and column agree)."""
    return isinstance(item, exp.Column) and item.name == name


def _resolve_group(ctx: _Context, tree: exp.Select, names: list[str]) -> None:
    """GROUP BY positions and output names become the output's expression; input names win, as in PostgreSQL."""
    group = tree.args.get("group")
    if group is None:
        return
    inputs = _input_columns(ctx)
    explicit = {item.alias for item in tree.expressions if isinstance(item, exp.Alias)}
    resolved: list[exp.Expr] = []
    for g in group.expressions:
        if isinstance(g, exp.Literal) and g.is_int:
            position = int(g.this)
            if not 1 <= position <= len(tree.expressions):
                raise QueryRefused("syntax", f"GROUP BY {position} is out of range")
            target = tree.expressions[position - 1].unalias()
            if _has_aggregate(target):
                raise QueryRefused("aggregation rule", f"GROUP BY {position} groups by an aggregate")
            resolved.append(target.copy())
            continue
        if isinstance(g, exp.Literal):
            raise QueryRefused("syntax", f"GROUP BY {_part(g)}: group by a column, an output position or an output name")
        if _is_bare_name(g) and g.name in explicit:
            target = _output_expression(tree, names, g.name)
            if g.name in inputs and not _same_as_input(ctx, target, g.name):
                raise QueryRefused(
                    "ambiguous names",
                    f"GROUP BY {g.name} could mean the output column {g.name} ({_part(target)}) or the input column {g.name}; "
                    "PostgreSQL would group by the input column. Rename the output or group by its position",
                )
            if g.name not in inputs:
                if _has_aggregate(target):
                    raise QueryRefused("aggregation rule", f"GROUP BY {g.name} groups by an aggregate")
                resolved.append(target.copy())
                continue
        if _has_aggregate(g):
            raise QueryRefused("aggregation rule", f"GROUP BY {_part(g)} groups by an aggregate")
        resolved.append(g)
    group.set("expressions", resolved)


def _check_having(ctx: _Context, tree: exp.Select, names: list[str]) -> None:
    having = tree.args.get("having")
    if having is None:
        return
    inputs = _input_columns(ctx)
    for column in having.find_all(exp.Column):
        if _is_bare_name(column) and column.name in names and column.name not in inputs:
            raise QueryRefused(
                "ambiguous names",
                f"HAVING {column.name}: HAVING reads input columns and aggregates, not output names (as in PostgreSQL); repeat the expression",
            )


def _resolve_order(ctx: _Context, tree: exp.Select, names: list[str]) -> list[tuple[str, bool, bool | None]]:
    """ORDER BY items as (output name, descending, nulls first); each must name, number or repeat an output."""
    for bound in (tree.args.get("limit"), tree.args.get("offset")):
        if bound is not None:
            value = bound.expression
            if not (isinstance(value, exp.Literal) and value.is_int):
                raise QueryRefused("limit", f"{_part(bound)} takes a whole number")
    order = tree.args.get("order")
    if order is None:
        return []
    inputs = _input_columns(ctx)
    out = []
    for ordered in order.expressions:
        target = ordered.this
        if isinstance(target, exp.Literal) and target.is_int and 1 <= int(target.this) <= len(names):
            name = names[int(target.this) - 1]
        elif _is_bare_name(target) and target.name in names:
            if target.name in inputs and not _same_as_input(ctx, _output_expression(tree, names, target.name), target.name):
                raise QueryRefused(
                    "ambiguous names",
                    f"ORDER BY {target.name} could mean the output column {target.name} or the input column {target.name}; "
                    "rename the output or order by its position",
                )
            name = target.name
        else:
            matches = [n for n, item in zip(names, tree.expressions, strict=False) if item.unalias().sql() == target.sql()]
            if not matches:
                raise QueryRefused("order by", f"ORDER BY {_part(target)} must name an output column, its position, or repeat an output expression")
            name = matches[0]
        out.append((name, bool(ordered.args.get("desc")), ordered.args.get("nulls_first")))
    tree.set("order", None)
    return out


def _qualify(ctx: _Context, tree: exp.Select) -> None:
    """Give every column reference its table alias, so that what is checked is what PostgreSQL reads."""
    for column in list(tree.find_all(exp.Column)):
        alias, name, _ = _resolve(ctx, column)
        column.set("table", exp.to_identifier(alias))
        column.set("this", exp.to_identifier(name))


def _clause(node: exp.Expr, tree: exp.Select) -> str:
    while node.parent is not None and node.parent is not tree:
        node = node.parent
    clauses: dict[type[exp.Expr], str] = {exp.Join: "join", exp.Where: "where", exp.Group: "group", exp.Having: "having", exp.Order: "order"}
    return clauses.get(type(node), "select")


def _aggregate_of(node: exp.Expr) -> exp.Expr | None:
    parent = node.parent
    while parent is not None:
        if type(parent) in AGGREGATES:
            return parent
        parent = parent.parent
    return None


def _aggregate_function(agg: exp.Expr) -> AggregateFunction:
    distinct = isinstance(agg.this, exp.Distinct)
    base = AGGREGATES[type(agg)]
    if distinct and base in ("count", "sum"):
        return AggregateFunction(f"{base}_distinct")
    if distinct:
        raise QueryRefused("aggregation rule, aggregate functions", f"{base.upper()}(DISTINCT ...) is not an allowed aggregate ({_part(agg)})")
    return AggregateFunction(base)


def _is_units(agg: exp.Expr | None, column: exp.Column, spec: Column, rule: str) -> bool:
    """COUNT(DISTINCT join column) counts matched people: it becomes COUNT(DISTINCT match_id)."""
    return (
        agg is not None and isinstance(agg, exp.Count) and isinstance(agg.this, exp.Distinct)
        and agg.this.expressions == [column] and spec.join and rule in ("aggregation", "differential_privacy")
    )


def _check_columns(ctx: _Context, tree: exp.Select) -> None:
    """Every (qualified) column reference against its role in the clause it appears in."""
    for column in list(tree.find_all(exp.Column)):
        clause = _clause(column, tree)
        alias, name, spec = _resolve(ctx, column)
        dataset = ctx.tables[alias].dataset
        rule = ctx.tables[alias].rule
        agg = _aggregate_of(column)
        if clause == "join":
            if not spec.join:
                raise QueryRefused(f"{rule} rule, join columns", f"{dataset}.{name} is not a join column; joins are allowed on join columns only")
            continue
        if spec.join or spec.identifier is not None:
            if _is_units(agg, column, spec, rule):
                continue
            raise QueryRefused(f"{rule} rule, join columns", f"join column {dataset}.{name} may be joined on, never output or filtered")
        if agg is not None:
            function = _aggregate_function(agg)
            if function not in spec.aggregate:
                allowed = ", ".join(f.value for f in spec.aggregate) or "none"
                raise QueryRefused(
                    f"{rule} rule, aggregate columns",
                    f"{function.value.upper().replace('_', ' ')} of {dataset}.{name} is not allowed (allowed: {allowed})",
                )
            continue
        if tree.args.get("distinct") and rule == "aggregation":
            if clause == "select" or not spec.dimension:
                raise QueryRefused("list rule, list columns", f"{dataset}.{name}: a list query outputs list columns of list-rule datasets only")
            continue
        if rule == "list":
            if not (spec.list or (clause == "where" and spec.dimension)):
                raise QueryRefused("list rule, list columns", f"{dataset}.{name} is not a list column of {dataset}")
            continue
        if not spec.dimension:
            role = "an aggregate column: use it inside an allowed aggregate" if spec.aggregate else "not a dimension column"
            raise QueryRefused(f"{rule} rule, dimension columns", f"{dataset}.{name} is {role}")


def _check_joins(ctx: _Context, tree: exp.Select, rules: dict[str, set[str] | list[str]]) -> None:
    operators = rules["operators"]
    seen = [next(iter(ctx.tables))]
    for join in tree.args.get("joins") or []:
        kind = (join.args.get("kind") or "").lower()
        side = (join.args.get("side") or "").lower()
        if side or kind not in ("", "inner") or join.args.get("using") or join.args.get("method"):
            raise QueryRefused("joins", f"only INNER JOIN ... ON is allowed, not {_part(join).split(' ON ')[0]}")
        condition = join.args.get("on")
        if condition is None:
            raise QueryRefused("joins", f"{_part(join)} has no ON condition on the join columns")
        alias = join.this.alias or join.this.name
        links: set[str] = set()
        for node in condition.walk():
            if isinstance(node, (exp.And, exp.Or)):
                op = "and" if isinstance(node, exp.And) else "or"
                if op not in operators:
                    raise QueryRefused("join_operators", f"{op.upper()} is not an allowed join operator of the datasets read (allowed: {', '.join(sorted(operators))})")
            elif isinstance(node, exp.EQ):
                left, right = node.this, node.expression
                if not (isinstance(left, exp.Column) and isinstance(right, exp.Column)):
                    raise QueryRefused("joins", f"join condition {_part(node)} must compare two join columns")
                tables = {_resolve(ctx, left)[0], _resolve(ctx, right)[0]}
                if len(tables) != 2:
                    raise QueryRefused("joins", f"join condition {_part(node)} must compare columns of two different datasets")
                links |= tables
            elif not isinstance(node, (exp.Paren, exp.Column, exp.Identifier)):
                raise QueryRefused("joins", f"join condition {_part(condition)} may only compare join columns with = (combined with AND/OR)")
        if alias not in links or not (links - {alias}) & set(seen):
            raise QueryRefused("joins", f"the ON condition of {join.this.name} must link it to a dataset joined before it")
        seen.append(alias)


def _has_aggregate(node: exp.Expr) -> bool:
    return any(type(n) in AGGREGATES for n in node.walk())


def _check_list_shape(ctx: _Context, tree: exp.Select) -> None:
    distinct = tree.args["distinct"]
    if distinct.args.get("on"):
        raise QueryRefused("list rule", "SELECT DISTINCT ON is not allowed")
    if tree.args.get("group") or tree.args.get("having") or any(_has_aggregate(e) for e in tree.expressions):
        raise QueryRefused("list rule", "a list query is SELECT DISTINCT of list columns: no aggregates, GROUP BY or HAVING")


# --- the total grammar of phase 1 ----------------------------------------------
#
# Types: the policy's column types, plus "unknown" (a quoted literal, typed by
# PostgreSQL when it parses the statement, so a bad literal fails for every
# database alike), "number" (a numeric literal) and "null".

_NUMERIC = {"integer", "numeric", "number"}


def _refuse_pre(node: exp.Expr, why: str) -> QueryRefused:
    return QueryRefused(
        PRE_THRESHOLD,
        f"{_part(node)}: {why}. Expressions in WHERE, GROUP BY and inside aggregates run on every row, even rows of "
        "groups below the threshold, so they must not be able to fail; do arithmetic on the aggregates instead "
        "(e.g. sum(x) * 2, not sum(x * 2))",
    )


def _unify(node: exp.Expr, a: str, b: str) -> str:
    if a == "null":
        return b
    if b == "null" or a == b:
        return a
    if a == "unknown":
        return b
    if b == "unknown":
        return a
    if a in _NUMERIC and b in _NUMERIC:
        return "numeric" if "numeric" in (a, b) or "number" in (a, b) else "integer"
    raise _refuse_pre(node, f"compares or combines a {a} with a {b}; PostgreSQL would convert one of them, which can fail on some values")


def _int_literal(node: exp.Expr | None) -> int | None:
    if isinstance(node, exp.Literal) and node.is_int:
        return int(node.this)
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and node.this.is_int:
        return -int(node.this.this)
    return None


def _column_type(ctx: _Context, column: exp.Column) -> str:
    alias, name, spec = _resolve(ctx, column)
    return "integer" if spec.type == ColumnType.INTEGER else spec.type.value


_CAST_TARGETS = {
    exp.DataType.Type.TEXT: "text", exp.DataType.Type.VARCHAR: "text", exp.DataType.Type.DATE: "date",
    exp.DataType.Type.TIMESTAMP: "timestamp", exp.DataType.Type.DECIMAL: "numeric", exp.DataType.Type.BIGINT: "integer",
    exp.DataType.Type.INT: "integer", exp.DataType.Type.BOOLEAN: "boolean",
}
# Conversions of a column value that succeed for every value of the source type.
_TOTAL_CASTS = {("integer", "numeric"), ("timestamp", "date")} | {(t, "text") for t in ("text", "integer", "numeric", "date", "timestamp", "boolean")}


def _ptype(ctx: _Context, node: exp.Expr) -> str:
    """The type of a phase-1 value expression, or a refusal if it could fail on some row."""
    if isinstance(node, exp.Paren):
        return _ptype(ctx, node.this)
    if isinstance(node, exp.Column):
        return _column_type(ctx, node)
    if isinstance(node, exp.Literal):
        return "unknown" if node.is_string else "number"
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and node.this.is_number:
        return "number"
    if isinstance(node, exp.Boolean):
        return "boolean"
    if isinstance(node, exp.Null):
        return "null"
    if isinstance(node, (exp.Lower, exp.Upper)):
        _expect(ctx, node.this, {"text", "unknown"})
        return "text"
    if isinstance(node, exp.Trim):
        _expect(ctx, node.this, {"text", "unknown"})
        chars = node.args.get("expression")
        if chars is not None and not (isinstance(chars, exp.Literal) and chars.is_string):
            raise _refuse_pre(node, "TRIM removes only literal characters before the threshold")
        return "text"
    if isinstance(node, exp.Length):
        _expect(ctx, node.this, {"text", "unknown"})
        return "integer"
    if isinstance(node, exp.Substring):
        _expect(ctx, node.this, {"text", "unknown"})
        start, length = node.args.get("start"), node.args.get("length")
        if start is not None and _int_literal(start) is None:
            raise _refuse_pre(node, "SUBSTRING takes whole-number literals before the threshold")
        if length is not None and (_int_literal(length) is None or (_int_literal(length) or 0) < 0):
            raise _refuse_pre(node, "SUBSTRING's length must be a whole-number literal of at least 0 (a negative length is an error)")
        return "text"
    if isinstance(node, (exp.Concat, exp.DPipe)):
        parts = node.expressions if isinstance(node, exp.Concat) else [node.this, node.expression]
        for part in parts:
            _ptype(ctx, part)
        return "text"
    if isinstance(node, (exp.Coalesce, exp.Greatest, exp.Least)):
        result = _ptype(ctx, node.this)
        for other in node.expressions:
            result = _unify(node, result, _ptype(ctx, other))
        return result
    if isinstance(node, exp.Round):
        _expect(ctx, node.this, _NUMERIC)
        digits = node.args.get("decimals")
        if digits is not None and not (_int_literal(digits) is not None and abs(_int_literal(digits) or 0) <= ROUND_DIGITS):
            raise _refuse_pre(node, f"ROUND's digits must be a whole-number literal between -{ROUND_DIGITS} and {ROUND_DIGITS}")
        return "numeric"
    if isinstance(node, exp.Abs):
        _expect(ctx, node.this, {"numeric", "number"}, "ABS of an integer column overflows at its most negative value; use it on an aggregate")
        return "numeric"
    if isinstance(node, (exp.Floor, exp.Ceil)):
        _expect(ctx, node.this, _NUMERIC)
        if node.args.get("decimals") is not None:
            raise _refuse_pre(node, "FLOOR/CEIL take one argument before the threshold")
        return "numeric"
    if isinstance(node, (exp.TimestampTrunc, exp.DateTrunc)):
        unit = node.args.get("unit")
        unit_name = (unit.name if isinstance(unit, (exp.Var, exp.Literal)) else "").lower()
        if unit_name not in TRUNC_UNITS:
            raise _refuse_pre(node, f"DATE_TRUNC's unit must be one of {', '.join(sorted(TRUNC_UNITS))}")
        if node.args.get("zone") is not None:
            raise _refuse_pre(node, "DATE_TRUNC takes no time zone before the threshold")
        _expect(ctx, node.this, {"timestamp"}, "DATE_TRUNC works on timestamp columns only before the threshold (a date would be converted, which can fail); use EXTRACT on dates")
        return "timestamp"
    if isinstance(node, exp.Extract):
        field_name = node.this.name.lower() if isinstance(node.this, (exp.Var, exp.Literal)) else ""
        source = _ptype(ctx, node.expression)
        fields = DATE_FIELDS if source == "date" else TIMESTAMP_FIELDS if source == "timestamp" else None
        if fields is None:
            raise _refuse_pre(node, f"EXTRACT reads a date or timestamp, not a {source}")
        if field_name not in fields:
            raise _refuse_pre(node, f"EXTRACT({field_name.upper()} FROM a {source}) is not defined; fields: {', '.join(sorted(fields))}")
        return "numeric"
    if isinstance(node, exp.Cast):
        target = _CAST_TARGETS.get(node.to.this) if isinstance(node.to, exp.DataType) else None
        if target is None or node.to.expressions:
            raise _refuse_pre(node, f"CAST to {_part(node.to)} is not allowed before the threshold (text, date, timestamp, numeric, bigint, boolean)")
        if isinstance(node.this, exp.Literal) or (isinstance(node.this, exp.Neg) and isinstance(node.this.this, exp.Literal)):
            return target  # a typed literal: PostgreSQL converts it while parsing, for every database alike
        source = _ptype(ctx, node.this)
        if source != target and (source, target) not in _TOTAL_CASTS:
            raise _refuse_pre(node, f"CAST from {source} to {target} can fail on some values; allowed: to text, bigint to numeric, timestamp to date")
        return target
    if isinstance(node, (exp.Case, exp.If)):
        branches = node.args.get("ifs") or [] if isinstance(node, exp.Case) else [node]
        if isinstance(node, exp.Case) and node.this is not None:
            raise _refuse_pre(node, "write CASE WHEN <condition> THEN ... (the simple CASE form compares with conversions)")
        result = "null"
        for branch in branches:
            _pcond(ctx, branch.this)
            result = _unify(node, result, _ptype(ctx, branch.args["true"]))
        default = node.args.get("default") if isinstance(node, exp.Case) else node.args.get("false")
        if default is not None:
            result = _unify(node, result, _ptype(ctx, default))
        return result
    if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Neg)):
        raise _refuse_pre(node, "arithmetic can overflow on some values")
    if isinstance(node, exp.Interval):
        raise _refuse_pre(node, "interval arithmetic can overflow on some values")
    raise _refuse_pre(node, f"{sql_name(node).upper()} is not allowed here")


def _expect(ctx: _Context, node: exp.Expr, allowed: set[str], why: str | None = None) -> str:
    found = _ptype(ctx, node)
    if found not in allowed and found != "null":
        raise _refuse_pre(node, why or f"expects a {' or '.join(sorted(t for t in allowed if t not in ('unknown', 'number')))} value, not a {found}")
    return found


def _like_pattern_ok(pattern: str) -> bool:
    """PostgreSQL refuses a LIKE pattern that ends with its escape character (a backslash)."""
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    return trailing % 2 == 0


def _pcond(ctx: _Context, node: exp.Expr) -> None:
    """A phase-1 condition: comparisons of total values with literals or each other, combined with AND/OR/NOT."""
    if isinstance(node, exp.Paren):
        return _pcond(ctx, node.this)
    if isinstance(node, (exp.And, exp.Or)):
        _pcond(ctx, node.this)
        _pcond(ctx, node.expression)
        return None
    if isinstance(node, exp.Not):
        return _pcond(ctx, node.this)
    if isinstance(node, (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        _unify(node, _ptype(ctx, node.this), _ptype(ctx, node.expression))
        return None
    if isinstance(node, exp.Is):
        if not isinstance(node.expression, (exp.Null, exp.Boolean)):
            raise _refuse_pre(node, "IS compares with NULL, TRUE or FALSE only")
        _ptype(ctx, node.this)
        return None
    if isinstance(node, exp.In):
        if node.args.get("query") is not None or node.args.get("unnest") is not None:
            raise _refuse_pre(node, "IN takes a list of literals")
        result = _ptype(ctx, node.this)
        for value in node.expressions:
            if not isinstance(value, (exp.Literal, exp.Null, exp.Boolean)) and not (isinstance(value, exp.Neg) and isinstance(value.this, exp.Literal)):
                raise _refuse_pre(node, "IN takes a list of literals before the threshold")
            result = _unify(node, result, _ptype(ctx, value))
        return None
    if isinstance(node, exp.Between):
        _unify(node, _unify(node, _ptype(ctx, node.this), _ptype(ctx, node.args["low"])), _ptype(ctx, node.args["high"]))
        return None
    if isinstance(node, (exp.Like, exp.ILike)):
        _expect(ctx, node.this, {"text", "unknown"})
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise _refuse_pre(node, "LIKE takes a literal pattern before the threshold")
        if not _like_pattern_ok(pattern.this):
            raise _refuse_pre(node, "a LIKE pattern must not end with the escape character \\")
        return None
    if isinstance(node, (exp.Column, exp.Boolean)):
        _expect(ctx, node, {"boolean"})
        return None
    raise _refuse_pre(node, f"{sql_name(node).upper()} is not a condition allowed here")


def _check_aggregate_argument(ctx: _Context, agg: exp.Expr) -> None:
    inner = agg.this
    if isinstance(inner, exp.Star):
        return
    if isinstance(inner, exp.Distinct):
        if len(inner.expressions) != 1:
            raise _refuse_pre(agg, "DISTINCT inside an aggregate takes one expression")
        inner = inner.expressions[0]
    found = _ptype(ctx, inner)
    name = AGGREGATES[type(agg)]
    if name in ("sum", "avg", "stddev", "variance") and found not in _NUMERIC:
        raise _refuse_pre(agg, f"{name.upper()} needs a numeric value, not a {found}")


# --- planning ------------------------------------------------------------------


def _output_names(tree: exp.Select) -> list[str]:
    names: list[str] = []
    for i, item in enumerate(tree.expressions, start=1):
        name = item.alias if isinstance(item, exp.Alias) else (item.name if isinstance(item, exp.Column) else "")
        if not name:
            inner = item.unalias()
            name = AGGREGATES.get(type(inner)) or SCALAR_FORMS.get(type(inner)) or f"column_{i}"
        if name.startswith("dcr_"):
            raise QueryRefused("columns", f"output name {name} is reserved")
        base, n = name, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _q(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _physical(ctx: _Context) -> Callable[[exp.Expr], exp.Expr]:
    """The transform from the checked tree onto the matched views: tables to views, join columns to match_id."""
    c = ctx.loaded.name

    def physical(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Table):
            alias = node.alias or node.name
            return exp.Table(this=_q(f"matched_{node.name}"), db=_q(naming.analysis_schema(c)), alias=exp.TableAlias(this=_q(alias)))
        if isinstance(node, exp.Column):
            alias, name, spec = _resolve(ctx, node)
            return exp.Column(this=_q("match_id" if spec.identifier is not None else name), table=_q(alias))
        return node

    return physical


def _source(ctx: _Context, tree: exp.Select, extra: Sequence[exp.Expr] = ()) -> exp.Select:
    """FROM, joins and WHERE of the query on the matched views (``extra`` conditions are ANDed to WHERE)."""
    physical = _physical(ctx)
    from_ = tree.args.get("from") or tree.args.get("from_")
    assert from_ is not None, "checked queries have a FROM clause"
    base = exp.Select().from_(from_.this.transform(physical))
    for join in tree.args.get("joins") or []:
        base.append("joins", join.transform(physical))
    where = tree.args.get("where")
    conditions = ([exp.Paren(this=where.this.transform(physical))] if where is not None else []) + list(extra)
    if conditions:
        base = base.where(exp.and_(*conditions, copy=False), copy=False)
    return base


def _tables_of(ctx: _Context, node: exp.Expr) -> set[str]:
    return {_resolve(ctx, column)[0] for column in node.find_all(exp.Column)}


def _sql(node: exp.Expr) -> str:
    return node.sql(dialect="postgres")


def _number(value: float) -> str:
    return f"cast('{float(value)!r}' as numeric)"


def _group_clause(count: int) -> str:
    return f" group by {', '.join(str(i) for i in range(1, count + 1))}" if count else ""


def _exact_phase1(ctx: _Context, tree: exp.Select, keys: list[exp.Expr], aggregates: list[exp.Expr], threshold: int) -> tuple[str, str]:
    """Phase 1 of the exact mode, per person first: a person counts once per group (COUNT(*) and COUNT(x) count people)
    and every row of a dataset counts once however many rows of other datasets join it (SUM, AVG, STDDEV, VARIANCE
    read each source row once). Returns the statement with and without the groups' people."""
    physical = _physical(ctx)
    first = next(iter(ctx.tables))
    key_sql = [_sql(k.transform(physical)) for k in keys]
    items = [f'{k} as "k{i}"' for i, k in enumerate(key_sql, start=1)]
    items.append(f'{_sql(exp.Column(this=_q(UNIT_COLUMN), table=_q(first)))} as "dcr_u"')
    outer: list[str] = []
    for j, agg in enumerate(aggregates, start=1):
        name = AGGREGATES[type(agg)]
        inner = agg.this
        distinct = isinstance(inner, exp.Distinct)
        if distinct:
            inner = inner.expressions[0]
        if isinstance(inner, exp.Star):
            outer.append('count(distinct "dcr_u")')
            continue
        items.append(f'{_sql(inner.transform(physical))} as "v{j}"')
        if name == "count" and not distinct:
            outer.append(f'count(distinct "dcr_u") filter (where "v{j}" is not null)')
        elif distinct or name in ("min", "max"):
            outer.append(f'{name}({"distinct " if distinct else ""}"v{j}")')
        else:
            tables = _tables_of(ctx, inner)
            if len(tables) != 1:
                raise QueryRefused(
                    "aggregation rule, per person",
                    f"{_part(agg)} must read the columns of one dataset: each row of that dataset counts once per group, "
                    "however many rows of other datasets join it",
                )
            row = _sql(exp.Column(this=_q(ROW_COLUMN), table=_q(tables.pop())))
            items.append(f'row_number() over (partition by {", ".join([*key_sql, row])}) as "r{j}"')
            outer.append(f'{"stddev_samp" if name == "stddev" else "var_samp" if name == "variance" else name}("v{j}") filter (where "r{j}" = 1)')
    source = _source(ctx, tree)
    source.set("expressions", [sqlglot.parse_one(i, read="postgres") for i in items])
    groups = [f'"k{i}" as "k{i}"' for i in range(1, len(keys) + 1)]
    head = ", ".join([*groups, *(f'{o} as "a{j}"' for j, o in enumerate(outer, start=1)), f'count(distinct "dcr_u") as "{UNITS}"'])
    tail = f' from ({_sql(source)}) as "dcr_rows"{_group_clause(len(keys))} having count(distinct "dcr_u") >= {int(threshold)}'
    without = f"select {head}{tail}"
    with_people = f'select {head}, array_agg(distinct "dcr_u" order by "dcr_u") as "{PEOPLE}"{tail}'
    return with_people, without


MAX_DOMAIN_CELLS = 10_000


def _bounds(ctx: _Context, agg: exp.Expr) -> tuple[float, float]:
    """The per-person clamp of SUM or AVG: the bounds its dataset's rule declares for the column, or the column's range."""
    columns = list(agg.find_all(exp.Column))
    resolved = {(alias, name) for alias, name, _ in (_resolve(ctx, c) for c in columns)}
    if len(resolved) != 1:
        raise QueryRefused("differential_privacy rule, bounds",
                           f"{_part(agg)} must read exactly one column, whose bounds limit what one person adds to a group")
    alias, name = resolved.pop()
    ds = ctx.dataset(alias)
    bound = ds.analysis_rule.bounds.get(name) or ds.columns[name].range
    if bound is None:
        raise QueryRefused("differential_privacy rule, bounds", f"{ctx.tables[alias].dataset}.{name} has no declared bounds, so its sum cannot be noised")
    return float(bound[0]), float(bound[1])


def _dp_aggregate(ctx: _Context, agg: exp.Expr, max_rows: int) -> DpAggregate:
    name = AGGREGATES[type(agg)]
    inner = agg.this
    distinct = isinstance(inner, exp.Distinct)
    label = _part(agg)
    if name == "count" and distinct:
        column = inner.expressions[0]
        if isinstance(column, exp.Column) and _resolve(ctx, column)[2].join:
            return DpAggregate("count_people", label, 0.0, 1.0)
        raise QueryRefused("differential_privacy rule, aggregates", f"{label}: COUNT(DISTINCT ...) is noised for people only (COUNT(DISTINCT <join column>))")
    if name == "count":
        return DpAggregate("count_rows", label, 0.0, float(max_rows))
    if name in ("sum", "avg") and not distinct:
        low, high = _bounds(ctx, agg)
        return DpAggregate(name, label, low, high)
    raise QueryRefused("differential_privacy rule, aggregates",
                       f"{label}: {name.upper()}{'(DISTINCT ...)' if distinct else ''} is not available with noise; use COUNT, SUM or AVG")


def _one_row_per_person(ctx: _Context, alias: str) -> bool:
    ds = ctx.dataset(alias)
    identity = ctx.loaded.collaboration.identity
    if len(identity.kinds) > 1:  # people who share any identifier are one: two rows unique by email can be one person
        return False
    return any(spec.identifier == identity.kind and spec.unique for spec in ds.columns.values())


def _domain(ctx: _Context, key: exp.Expr) -> tuple[str, ...] | None:
    if not isinstance(key, exp.Column):
        return None
    _, _, spec = _resolve(ctx, key)
    return tuple(spec.allowed_values) if spec.allowed_values else None


def _dp_plan(ctx: _Context, tree: exp.Select, keys: list[exp.Expr], aggregates: list[exp.Expr], threshold: int) -> tuple[DpQuery, str]:
    """The noise plan of a DP query and its phase 1: per group, each aggregate summed over people after each person's
    contribution was bounded (at most ``max_groups`` groups, each value clamped)."""
    rules = [ctx.loaded.collaboration.datasets[use.dataset].analysis_rule for use in ctx.tables.values()]
    dp_rules = [r for r in rules if r.type == "differential_privacy"]
    max_groups = min(r.max_groups_per_person for r in dp_rules)
    if all(_one_row_per_person(ctx, alias) for key in keys for alias in _tables_of(ctx, key)) and all(_tables_of(ctx, k) for k in keys):
        max_groups = 1  # keys read only datasets with one row per person (a unique identifier): one group each (and the SQL holds it to that)
    max_rows = min(r.max_rows_per_group for r in dp_rules)
    noised = [_dp_aggregate(ctx, a, max_rows) for a in aggregates]
    domains = [_domain(ctx, k) for k in keys]
    public = all(d is not None for d in domains)
    spec = DpQuery(
        epsilon=min(r.epsilon_per_query for r in dp_rules),
        key_selection_delta=min(r.key_selection_delta for r in dp_rules),
        max_groups=max_groups,
        max_rows=max_rows,
        aggregates=tuple(noised),
        domains=tuple(d for d in domains if d is not None) if public else None,
        min_people=threshold,
    )
    if spec.domains is not None and spec.cells > MAX_DOMAIN_CELLS:
        raise QueryRefused("differential_privacy rule, groups", f"the public domains of the GROUP BY keys make {spec.cells} groups, more than {MAX_DOMAIN_CELLS}")
    physical = _physical(ctx)
    first = next(iter(ctx.tables))
    key_sql = [_sql(k.transform(physical)) for k in keys]
    restrict = [sqlglot.parse_one(f"cast({k} as text) in ({', '.join(_literal(v) for v in d)})", read="postgres")
                for k, d in zip(key_sql, domains, strict=True) if d is not None and public]
    items = [f'{k} as "k{i}"' for i, k in enumerate(key_sql, start=1)]
    items.append(f'{_sql(exp.Column(this=_q(UNIT_COLUMN), table=_q(first)))} as "dcr_u"')
    person: list[str] = []
    group: list[str] = []
    for j, (agg, plan) in enumerate(zip(aggregates, noised, strict=True), start=1):
        inner = agg.this
        if plan.function == "count_people":
            person.append(f'1 as "p{j}"')
            group.append(f'sum("p{j}") as "a{j}"')
            continue
        if not isinstance(inner, exp.Star):
            items.append(f'{_sql(inner.transform(physical))} as "v{j}"')
        low, high = _number(plan.lower), _number(plan.upper)
        if plan.function == "count_rows":
            counted = "count(*)" if isinstance(inner, exp.Star) else f'count("v{j}")'
            person.append(f'least({counted}, {int(plan.upper)}) as "p{j}"')
            group.append(f'sum("p{j}") as "a{j}"')
        else:
            # The person's own sum or average reads each row of the column's dataset once, however many rows of other
            # datasets join it (as in exact mode); then it is clamped.
            (table,) = _tables_of(ctx, inner)
            row = _sql(exp.Column(this=_q(ROW_COLUMN), table=_q(table)))
            items.append(f'row_number() over (partition by {", ".join([*key_sql, row])}) as "r{j}"')
            once = f'filter (where "r{j}" = 1)'
            if plan.function == "sum":
                person.append(f'least(greatest(sum("v{j}") {once}, {low}), {high}) as "p{j}"')
                group.append(f'coalesce(sum("p{j}"), 0) as "a{j}"')
            else:
                person.append(f'least(greatest(avg("v{j}") {once}, {low}), {high}) as "p{j}"')
                group.append(f'coalesce(sum("p{j}"), 0) as "a{j}__sum", count("p{j}") as "a{j}__n"')
    source = _source(ctx, tree, restrict)
    source.set("expressions", [sqlglot.parse_one(i, read="postgres") for i in items])
    groups = [f'"k{i}"' for i in range(1, len(keys) + 1)]
    unit = '"dcr_u"'
    # Which groups a person keeps, past max_groups: the smallest hashes of (person, group), the same in every run.
    rank = f"row_number() over (partition by {unit} order by md5(row({', '.join([unit, *groups])})::text))"
    units = f'count(*) as "{UNITS}"'
    statement = (
        f'with "dcr_rows" as ({_sql(source)}), '
        f'"dcr_person" as (select {", ".join([*groups, unit, *person])} from "dcr_rows"{_group_clause(len(keys) + 1)}), '
        f'"dcr_bounded" as (select *, {rank} as "dcr_rank" from "dcr_person") '
        f'select {", ".join([*groups, units, *group])} from "dcr_bounded" where "dcr_rank" <= {max_groups}{_group_clause(len(keys))}'
    )
    return spec, statement


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _plan(
    ctx: _Context, tree: exp.Select, kind: str, names: list[str], order: list[tuple[str, bool, bool | None]],
    threshold: int, source: str | None, rules: tuple[str, ...],
) -> CheckedQuery:
    where = tree.args.get("where")
    if where is not None:
        _pcond(ctx, where.this)
    if kind == "list":
        keys = [item.unalias() for item in tree.expressions]
    else:
        group = tree.args.get("group")
        keys = list(group.expressions) if group else []
    for key in keys:
        _ptype(ctx, key)
    key_sql = [k.sql(dialect="postgres") for k in keys]
    aggregates: list[exp.Expr] = []
    aggregate_sql: list[str] = []

    def to_phase2(node: exp.Expr) -> exp.Expr:
        text = node.sql(dialect="postgres")
        if text in key_sql:
            return exp.column(f"k{key_sql.index(text) + 1}", table="g", quoted=True)
        if type(node) in AGGREGATES:
            if text not in aggregate_sql:
                _check_aggregate_argument(ctx, node)
                aggregates.append(node.copy())
                aggregate_sql.append(text)
            return exp.column(f"a{aggregate_sql.index(text) + 1}", table="g", quoted=True)
        if isinstance(node, exp.Column):
            raise QueryRefused("aggregation rule, dimension columns", f"output {_part(node)} is neither aggregated nor in GROUP BY")
        return node

    outputs = [item.unalias().transform(to_phase2) for item in tree.expressions]
    having = tree.args.get("having")
    having_sql = having.this.transform(to_phase2).sql(dialect="postgres") if having is not None else None
    dp_mode = any(use.rule == "differential_privacy" for use in ctx.tables.values())
    dp: DpQuery | None = None
    if dp_mode:
        dp, phase1 = _dp_plan(ctx, tree, keys, aggregates, threshold)
        without_people = phase1
    else:
        phase1, without_people = _exact_phase1(ctx, tree, keys, aggregates, threshold)
    order_sql = tuple(
        exp.Ordered(this=exp.column(n, table="dcr_out", quoted=True), desc=desc, nulls_first=nulls).sql(dialect="postgres")
        for n, desc, nulls in order
    )
    limit, offset = tree.args.get("limit"), tree.args.get("offset")
    return CheckedQuery(
        runner=ctx.runner,
        kind=kind,
        tables=tuple(ctx.tables.values()),
        min_distinct_units=threshold,
        threshold_from=source,
        columns=tuple(names),
        phase1=phase1,
        phase1_without_people=without_people,
        keys=len(keys),
        aggregates=len(aggregates),
        outputs=tuple(o.sql(dialect="postgres") for o in outputs),
        having=having_sql,
        order=order_sql,
        limit=int(limit.expression.this) if limit is not None else None,
        offset=int(offset.expression.this) if offset is not None else None,
        rules=rules,
        dp=dp,
    )


def hashable(text: str) -> str:
    """The query text as logged: whitespace collapsed (the hash identifies what was asked)."""
    return re.sub(r"\s+", " ", text.strip())


def query_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(hashable(text).encode()).hexdigest()


def datasets_named(loaded: LoadedCollaboration, text: str) -> list[str]:
    """Datasets a (possibly refused) query names, best effort: whose owners its audit entry concerns."""
    try:
        tree = sqlglot.parse_one(text, read="postgres")
    except (ParseError, TokenError, ValueError):
        return [d for d in loaded.collaboration.datasets if re.search(rf"\b{re.escape(d)}\b", text, re.IGNORECASE)]
    if tree is None:
        return []
    names = {t.name.lower() for t in tree.find_all(exp.Table)}
    return [d for d in loaded.collaboration.datasets if d in names]
