"""Ad-hoc SQL under the owners' analysis rules: check, then rewrite onto the matched views.

An analyst writes one SELECT over the collaboration's logical dataset names,
joining on the declared join columns, e.g.::

    select i.campaign_id, c.loyalty_tier, count(distinct c.customer_email) as buyers
    from impressions as i inner join customers as c on c.customer_email = i.user_email
    group by i.campaign_id, c.loyalty_tier

``check`` parses it with sqlglot and validates every node against the rules
of every dataset it reads (the most restrictive setting wins across
datasets). Anything not explicitly allowed is refused, naming the rule and
the offending part. ``CheckedQuery.sql`` is then regenerated from the
checked syntax tree (never the analyst's text, so comments and whitespace
cannot change what runs): datasets become their matched views, joins go
through ``match_id`` (the cross-reference), and an outer query drops every
output row with fewer distinct privacy units than the threshold.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from . import naming
from .policy import LoadedCollaboration
from .policy.models import Ability, AggregateFunction, Column, Dataset

if TYPE_CHECKING:
    import psycopg

UNITS = "dcr_units"

# Parsed forms of each scalar function an owner can allow (policy names: models.SCALAR_FUNCTIONS).
SCALAR_FORMS: dict[type[exp.Expression], str] = {
    exp.Lower: "lower", exp.Upper: "upper", exp.Trim: "trim", exp.Length: "length", exp.Substring: "substring",
    exp.Concat: "concat", exp.DPipe: "concat", exp.Round: "round", exp.Abs: "abs", exp.Floor: "floor", exp.Ceil: "ceil",
    exp.Coalesce: "coalesce", exp.Greatest: "greatest", exp.Least: "least", exp.TimestampTrunc: "date_trunc",
    exp.DateTrunc: "date_trunc", exp.Extract: "extract", exp.Cast: "cast", exp.Case: "case", exp.If: "case",
}
AGGREGATES: dict[type[exp.Expression], str] = {
    exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max", exp.Stddev: "stddev", exp.Variance: "variance",
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
    runner: str
    kind: str  # "aggregation" or "list"
    tables: tuple[TableUse, ...]
    min_distinct_units: int
    threshold_from: str | None
    columns: tuple[str, ...]
    sql: str
    rules: tuple[str, ...] = field(default=())

    def summary(self) -> list[str]:
        lines = [f"tables: {', '.join(f'{t.dataset} ({t.owner}, {t.rule} rule)' for t in self.tables)}"]
        lines += [f"rule: {r}" for r in self.rules]
        if self.min_distinct_units:
            lines.append(f"threshold: rows with fewer than {self.min_distinct_units} distinct people are removed (from {self.threshold_from})")
        lines.append(f"output columns: {', '.join(self.columns)}")
        return lines


def _part(node: exp.Expression) -> str:
    text = node.sql(dialect="postgres")
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class _Context:
    loaded: LoadedCollaboration
    runner: str
    tables: dict[str, TableUse] = field(default_factory=dict)

    def dataset(self, alias: str) -> Dataset:
        return self.loaded.collaboration.datasets[self.tables[alias].dataset]


def check(loaded: LoadedCollaboration, runner: str, text: str) -> CheckedQuery:
    """Validate ``text`` as ``runner`` against every rule; return it rewritten, or raise ``QueryRefused``."""
    _check_member(loaded, runner)
    tree = _parse(text)
    ctx = _Context(loaded, runner)
    _check_structure(tree)
    _check_tables(ctx, tree)
    rules = _rules(ctx)
    _check_nodes(ctx, tree, rules)
    _check_joins(ctx, tree, rules)
    columns = _check_columns(ctx, tree)
    kind = "list" if tree.args.get("distinct") else "aggregation"
    if kind == "list":
        _check_list_shape(ctx, tree)
    else:
        _check_aggregation_shape(ctx, tree, columns)
    threshold, source = 0, None
    for use in ctx.tables.values():
        units = ctx.loaded.collaboration.datasets[use.dataset].analysis_rule.min_distinct_units
        if units > threshold:
            threshold, source = units, f"the analysis rule of {use.dataset}"
    outputs, sql = _rewrite(ctx, tree, threshold)
    return CheckedQuery(runner, kind, tuple(ctx.tables.values()), threshold, source, tuple(outputs), sql, tuple(rules["described"]))


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
    sources: list[exp.Expression] = []
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


def _check_nodes(ctx: _Context, tree: exp.Select, rules: dict[str, set[str] | list[str]]) -> None:
    functions = rules["functions"]
    for node in tree.walk():
        if isinstance(node, (exp.Div, exp.Mod)):
            divisor = node.expression
            if not (isinstance(divisor, exp.Literal) and divisor.is_number and float(divisor.this) != 0):
                raise QueryRefused("arithmetic", f"{_part(node)}: divide only by a non-zero number; a division by zero in any group, even one below the threshold, would reveal it")
        if isinstance(node, NEUTRAL):
            continue
        if isinstance(node, exp.Anonymous) or (isinstance(node, exp.Func) and type(node) not in SCALAR_FORMS and type(node) not in AGGREGATES):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name.startswith(("pg_", "current_")) or name in SETTINGS_FUNCTIONS or "setting" in name:
                raise QueryRefused("system catalogs and settings", f"function {name} reads the server's state and is not allowed")
            raise QueryRefused("scalar functions", f"function {name} is not allowed ({_part(node)})")
        if type(node) in SCALAR_FORMS:
            name = SCALAR_FORMS[type(node)]
            if name not in functions:
                allowed = ", ".join(sorted(functions)) or "none"
                raise QueryRefused("aggregation rule, scalar_functions", f"function {name} is not on the allow-list of the datasets read ({_part(node)}; allowed: {allowed})")
            continue
        if type(node) in AGGREGATES:
            continue
        if not isinstance(node, NEUTRAL):
            raise QueryRefused("syntax", f"{type(node).__name__} is not allowed ({_part(node)})")


def _resolve(ctx: _Context, column: exp.Column) -> tuple[str, str, Column] | None:
    """(alias, column name, its policy spec), or None for an output alias (resolved by the caller)."""
    name = column.name
    if column.table:
        if column.table not in ctx.tables:
            raise QueryRefused("tables", f"{column.table} in {_part(column)} is not a dataset or alias of this query")
        candidates = [column.table]
    else:
        candidates = [a for a in ctx.tables if name in ctx.dataset(a).columns]
        if len(candidates) > 1:
            raise QueryRefused("columns", f"column {name} is ambiguous (in {', '.join(ctx.tables[a].dataset for a in candidates)}); qualify it")
        if not candidates:
            return None
    alias = candidates[0]
    ds = ctx.dataset(alias)
    if name not in ds.columns:
        raise QueryRefused("columns", f"column {name} does not exist in {ctx.tables[alias].dataset}")
    spec = ds.columns[name]
    if spec.identifier is None and name not in ds.shared_columns:
        raise QueryRefused("columns", f"column {name} of {ctx.tables[alias].dataset} is not shared by its owner")
    return alias, name, spec


def _clause(node: exp.Expression, tree: exp.Select) -> str:
    while node.parent is not None and node.parent is not tree:
        node = node.parent
    return {exp.Join: "join", exp.Where: "where", exp.Group: "group", exp.Having: "having", exp.Order: "order"}.get(type(node), "select")


def _aggregate_of(node: exp.Expression) -> exp.Expression | None:
    parent = node.parent
    while parent is not None:
        if type(parent) in AGGREGATES:
            return parent
        parent = parent.parent
    return None


def _aggregate_function(agg: exp.Expression) -> AggregateFunction:
    distinct = isinstance(agg.this, exp.Distinct)
    base = AGGREGATES[type(agg)]
    if distinct and base in ("count", "sum"):
        return AggregateFunction(f"{base}_distinct")
    if distinct:
        raise QueryRefused("aggregation rule, aggregate functions", f"{base.upper()}(DISTINCT ...) is not an allowed aggregate ({_part(agg)})")
    return AggregateFunction(base)


def _check_columns(ctx: _Context, tree: exp.Select) -> list[str]:
    """Every column reference against its role; returns the output names of the select list."""
    outputs = [e.alias if isinstance(e, exp.Alias) else (e.name if isinstance(e, exp.Column) else "") for e in tree.expressions]
    for column in list(tree.find_all(exp.Column)):
        clause = _clause(column, tree)
        resolved = _resolve(ctx, column)
        if resolved is None:
            if clause in ("group", "order", "having") and column.name in outputs and not column.table:
                continue  # an output alias
            raise QueryRefused("columns", f"column {column.name} does not exist in {', '.join(t.dataset for t in ctx.tables.values())}")
        alias, name, spec = resolved
        dataset = ctx.tables[alias].dataset
        rule = ctx.tables[alias].rule
        agg = _aggregate_of(column)
        if clause == "join":
            if not spec.join:
                raise QueryRefused(f"{rule} rule, join columns", f"{dataset}.{name} is not a join column; joins are allowed on join columns only")
            continue
        if spec.join or spec.identifier is not None:
            is_units = (
                agg is not None and isinstance(agg, exp.Count) and isinstance(agg.this, exp.Distinct)
                and agg.this.expressions == [column] and spec.join and rule == "aggregation"
            )
            if is_units:
                continue  # COUNT(DISTINCT join column) counts matched people: rewritten to match_id
            raise QueryRefused(f"{rule} rule, join columns", f"join column {dataset}.{name} may be joined on, never output or filtered")
        if agg is not None:
            function = _aggregate_function(agg)
            if function not in spec.aggregate:
                allowed = ", ".join(f.value for f in spec.aggregate) or "none"
                raise QueryRefused(
                    "aggregation rule, aggregate columns",
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
            raise QueryRefused("aggregation rule, dimension columns", f"{dataset}.{name} is {role}")
    return outputs


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
                tables = {r[0] for r in (_resolve(ctx, left), _resolve(ctx, right)) if r is not None}
                if len(tables) != 2:
                    raise QueryRefused("joins", f"join condition {_part(node)} must compare columns of two different datasets")
                links |= tables
            elif not isinstance(node, (exp.Paren, exp.Column, exp.Identifier)):
                raise QueryRefused("joins", f"join condition {_part(condition)} may only compare join columns with = (combined with AND/OR)")
        if alias not in links or not (links - {alias}) & set(seen):
            raise QueryRefused("joins", f"the ON condition of {join.this.name} must link it to a dataset joined before it")
        seen.append(alias)


def _has_aggregate(node: exp.Expression) -> bool:
    return any(type(n) in AGGREGATES for n in node.walk())


def _check_aggregation_shape(ctx: _Context, tree: exp.Select, outputs: list[str]) -> None:
    items = tree.expressions
    if not any(_has_aggregate(e) for e in items):
        raise QueryRefused("aggregation rule", "the query outputs no aggregate: every output row must aggregate people (COUNT, SUM, AVG, ...)")
    group = tree.args.get("group")
    grouped: set[str] = set()
    for g in group.expressions if group else []:
        if isinstance(g, exp.Literal) and g.is_int:
            position = int(g.this)
            if not 1 <= position <= len(items):
                raise QueryRefused("syntax", f"GROUP BY {position} is out of range")
            grouped.add(items[position - 1].unalias().sql())
        elif isinstance(g, exp.Column) and not g.table and g.name in outputs and _resolve(ctx, g) is None:
            grouped.add(items[outputs.index(g.name)].unalias().sql())
        else:
            if _has_aggregate(g):
                raise QueryRefused("aggregation rule", f"GROUP BY {_part(g)} groups by an aggregate")
            grouped.add(g.sql())
    for item in items:
        expression = item.unalias()
        if _has_aggregate(expression) or not list(expression.find_all(exp.Column)):
            continue
        if expression.sql() not in grouped:
            raise QueryRefused("aggregation rule, dimension columns", f"output {_part(expression)} is neither aggregated nor in GROUP BY")


def _check_list_shape(ctx: _Context, tree: exp.Select) -> None:
    distinct = tree.args["distinct"]
    if distinct.args.get("on"):
        raise QueryRefused("list rule", "SELECT DISTINCT ON is not allowed")
    if tree.args.get("group") or tree.args.get("having") or any(_has_aggregate(e) for e in tree.expressions):
        raise QueryRefused("list rule", "a list query is SELECT DISTINCT of list columns: no aggregates, GROUP BY or HAVING")


# --- rewrite -------------------------------------------------------------------


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


def _rewrite(ctx: _Context, tree: exp.Select, threshold: int) -> tuple[list[str], str]:
    c = ctx.loaded.name
    names = _output_names(tree)
    order = tree.args.get("order")
    limit, offset = tree.args.get("limit"), tree.args.get("offset")
    outer_order = []
    for ordered in order.expressions if order else []:
        target = ordered.this
        if isinstance(target, exp.Literal) and target.is_int and 1 <= int(target.this) <= len(names):
            name = names[int(target.this) - 1]
        elif isinstance(target, exp.Column) and not target.table and target.name in names:
            name = target.name
        else:
            matches = [n for n, item in zip(names, tree.expressions) if item.unalias().sql() == target.sql()]
            if not matches:
                raise QueryRefused("order by", f"ORDER BY {_part(target)} must name an output column, its position, or repeat an output expression")
            name = matches[0]
        outer_order.append(exp.Ordered(this=exp.column(name, quoted=True), desc=ordered.args.get("desc"), nulls_first=ordered.args.get("nulls_first")))
    for bound in (limit, offset):
        if bound is not None:
            value = bound.expression
            if not (isinstance(value, exp.Literal) and value.is_int):
                raise QueryRefused("limit", f"{_part(bound)} takes a whole number")

    inner = tree.copy()
    for key in ("order", "limit", "offset"):
        inner.set(key, None)

    def physical(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Table):
            alias = node.alias or node.name
            return exp.Table(
                this=exp.to_identifier(f"matched_{node.name}", quoted=True),
                db=exp.to_identifier(naming.analysis_schema(c), quoted=True),
                alias=exp.TableAlias(this=exp.to_identifier(alias, quoted=True)),
            )
        if isinstance(node, exp.Column):
            resolved = _resolve(ctx, node)
            if resolved is None:
                return node
            alias, name, spec = resolved
            target = "match_id" if spec.identifier is not None else name
            return exp.Column(this=exp.to_identifier(target, quoted=True), table=exp.to_identifier(alias, quoted=True))
        return node

    inner = inner.transform(physical)
    assert isinstance(inner, exp.Select)
    if inner.args.get("distinct"):  # list query: DISTINCT becomes GROUP BY, so people can be counted per row
        inner.set("distinct", None)
        inner.set("group", exp.Group(expressions=[exp.Literal.number(i) for i in range(1, len(names) + 1)]))
    inner.set("expressions", [exp.alias_(item.unalias(), name, quoted=True) for item, name in zip(inner.expressions, names)])
    first = next(iter(ctx.tables))
    units = exp.Count(this=exp.Distinct(expressions=[exp.column("match_id", table=first, quoted=True)]))
    inner.set("expressions", [*inner.expressions, exp.alias_(units, UNITS, quoted=True)])
    outer = (
        exp.select(*[exp.column(n, quoted=True) for n in names])
        .from_(exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier("dcr_q"))))
        .where(exp.GTE(this=exp.column(UNITS, quoted=True), expression=exp.Literal.number(threshold)))
    )
    if outer_order:
        outer = outer.order_by(*outer_order)
    if limit is not None:
        outer = outer.limit(limit.expression.copy())
    if offset is not None:
        outer = outer.offset(offset.expression.copy())
    return names, outer.sql(dialect="postgres", pretty=True)


def hashable(text: str) -> str:
    """The query text as logged: whitespace collapsed (the hash identifies what was asked)."""
    return re.sub(r"\s+", " ", text.strip())


# --- execution -----------------------------------------------------------------


def results_table(runner: str) -> str:
    return f"ad_hoc__{runner}"


def _plain_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()  # type: ignore[no-any-return,union-attr]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def execute(conn: psycopg.Connection, loaded: LoadedCollaboration, checked: CheckedQuery, run_id: str, text: str, timeout_s: int = 120) -> list[dict[str, object]]:
    """Run a checked query read-only as the analysis role; store its rows for the runner only; return them."""
    import json

    import psycopg
    from psycopg import sql

    from . import access

    c = loaded.name
    with conn.transaction():
        conn.execute("set transaction read only")
        conn.execute(sql.SQL("set local statement_timeout = {}").format(sql.Literal(f"{int(timeout_s)}s")))
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(access.role_name(c, "analysis_builder"))))
        try:
            cursor = conn.execute(checked.sql)  # type: ignore[arg-type]
        except psycopg.errors.QueryCanceled:
            raise QueryRefused("resources", f"the query ran longer than {timeout_s} s and was stopped") from None
        except psycopg.Error as exc:  # the database's message could quote a value from a row below the threshold
            raise QueryRefused("run time", f"the query failed in the database (SQLSTATE {exc.sqlstate}); details are withheld because they can depend on rows") from None
        names = [d.name for d in cursor.description or ()]
        rows = [dict(zip(names, (_plain_value(v) for v in row))) for row in cursor.fetchall()]
    schema = naming.results_schema(c)
    table = sql.Identifier(schema, results_table(checked.runner))
    reader = sql.Identifier(access.role_name(c, checked.runner, "result_reader"))
    with conn.transaction():
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "create table if not exists {} (run_id text not null, ran_at timestamptz not null default now(), "
                "query_sha256 text not null, query text not null, columns jsonb not null, rows jsonb not null)"
            ).format(table)
        )
        conn.execute(
            sql.SQL("insert into {} (run_id, query_sha256, query, columns, rows) values (%s, %s, %s, %s, %s)").format(table),
            (run_id, query_sha256(text), hashable(text), json.dumps(list(checked.columns)), json.dumps(rows)),
        )
        conn.execute(sql.SQL("grant usage on schema {} to {}").format(sql.Identifier(schema), reader))
        conn.execute(sql.SQL("grant select on {} to {}").format(table, reader))
    return rows


def stored_rows(conn: psycopg.Connection, collab: str, runner: str, run_id: str) -> tuple[list[str], list[dict[str, object]]]:
    from psycopg import sql

    row = conn.execute(
        sql.SQL("select columns, rows from {} where run_id = %s").format(sql.Identifier(naming.results_schema(collab), results_table(runner))),
        (run_id,),
    ).fetchone()
    if row is None:
        raise LookupError(f"no stored result of run {run_id}")
    return list(row[0]), list(row[1])


def query_sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(hashable(text).encode()).hexdigest()
