"""Each upload's contract, derived from the policy and checked with great-expectations 1.x.

The suite runs inside PostgreSQL on the freshly loaded version table, so it
sees every row of an upload of any size without holding it in memory. The
report keeps, per expectation, whether it passed, how many rows broke it and
the first row numbers (``dcr_line``, 1 = first data row); it never keeps a
value, since values may be identifiers.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .identifiers import TOKEN_PATTERN
from .policy.models import ColumnType, Dataset, IdentifierKind

ROW_NUMBER = "dcr_line"
ROWS_IN_REPORT = 20

# Identifier formats before normalisation (surrounding whitespace is trimmed later, so allowed here).
IDENTIFIER_FORMATS = {
    IdentifierKind.EMAIL: r"^\s*[^@\s]+@[^@\s]+\.[^@\s]+\s*$",
    IdentifierKind.PHONE: r"^\s*[+]?[0-9 ().-]{7,24}\s*$",
    IdentifierKind.CUSTOMER_ID: r"\S",
}


@dataclass(frozen=True)
class RuleOutcome:
    rule: str
    column: str | None
    success: bool
    unexpected_count: int
    rows: tuple[int, ...] = ()
    observed: Any = None

    def describe(self) -> str:
        where = f" on {self.column}" if self.column else ""
        if self.success:
            return f"{self.rule}{where}: ok"
        rows = f" (rows {', '.join(map(str, self.rows))}{', ...' if self.unexpected_count > len(self.rows) else ''})" if self.rows else ""
        observed = f", observed {self.observed}" if self.observed is not None and not self.rows else ""
        count = f"{self.unexpected_count} row(s) broke it{rows}" if self.unexpected_count else "failed"
        return f"{self.rule}{where}: {count}{observed}"


@dataclass(frozen=True)
class ValidationReport:
    outcomes: tuple[RuleOutcome, ...]
    row_count: int
    null_fractions: dict[str, float] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    def failures(self) -> list[RuleOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "row_count": self.row_count,
            "null_fractions": self.null_fractions,
            "rules": [
                {"rule": o.rule, "column": o.column, "success": o.success, "unexpected_count": o.unexpected_count,
                 "rows": list(o.rows), "observed": o.observed}
                for o in self.outcomes
            ],
        }


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def expectation_class(name: str) -> Any:
    """The great-expectations class for ``expect_...`` (raises KeyError for an unknown one)."""
    import great_expectations.expectations as gxe

    cls = getattr(gxe, _camel(name), None)
    if cls is None or not name.startswith("expect_"):
        raise KeyError(name)
    return cls


def build_suite(ds: Dataset, dataset_name: str, tokenised: bool = False) -> Any:
    """The expectation suite a dataset's contract implies, plus its own declared expectations.

    ``tokenised``: the owner keeps its identifiers at home, so identifier
    columns must hold its 64-hex-digit tokens instead.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"{dataset_name}_contract")
    add = suite.add_expectation
    add(gxe.ExpectTableRowCountToBeBetween(min_value=ds.rows.min, max_value=ds.rows.max))
    for name, col in ds.columns.items():
        if not col.nullable:
            add(gxe.ExpectColumnValuesToNotBeNull(column=name))
            if col.type == ColumnType.TEXT:
                add(gxe.ExpectColumnValuesToMatchRegex(column=name, regex=r"\S", meta={"dcr_rule": "not_blank"}))
        elif col.max_null_fraction is not None:
            add(gxe.ExpectColumnValuesToNotBeNull(column=name, mostly=1 - col.max_null_fraction, meta={"dcr_rule": "max_null_fraction"}))
        if col.unique:
            add(gxe.ExpectColumnValuesToBeUnique(column=name))
        if col.allowed_values is not None:
            add(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(col.allowed_values)))
        if col.range is not None:
            add(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=col.range[0], max_value=col.range[1]))
        if col.identifier is not None and tokenised:
            add(gxe.ExpectColumnValuesToMatchRegex(column=name, regex=TOKEN_PATTERN, meta={"dcr_rule": "token_format"}))
        elif col.identifier is not None:
            add(gxe.ExpectColumnValuesToMatchRegex(
                column=name, regex=IDENTIFIER_FORMATS[col.identifier], mostly=1 - col.max_invalid_fraction,
                meta={"dcr_rule": f"{col.identifier.value}_format"},
            ))
    # max_duplicate_fraction and `duplicates` are checked by the ingest service in SQL: they count extra copies only.
    for extra in ds.expectations:
        add(expectation_class(extra.type)(**extra.kwargs))
    return suite


def _rule_name(config: dict[str, Any]) -> str:
    meta = config.get("meta") or {}
    return str(meta.get("dcr_rule") or config["type"])


def _rows(result: dict[str, Any]) -> tuple[int, ...]:
    rows: list[int] = []
    for entry in result.get("partial_unexpected_index_list") or result.get("unexpected_index_list") or []:
        if isinstance(entry, dict) and ROW_NUMBER in entry:
            rows.append(int(entry[ROW_NUMBER]))
    return tuple(sorted(set(rows)))[:ROWS_IN_REPORT]


def validate_table(sqlalchemy_url: str, schema: str, table: str, ds: Dataset, dataset_name: str, tokenised: bool = False) -> ValidationReport:
    """Run the dataset's suite on ``schema.table`` (which has a ``dcr_line`` column) inside PostgreSQL."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except ImportError:  # pragma: no cover - older or newer layouts
        pass
    # The schema goes in the session's search_path (great-expectations deprecates schema_name).
    separator = "&" if "?" in sqlalchemy_url else "?"
    url = f"{sqlalchemy_url}{separator}options={quote(f'-csearch_path={schema}')}"
    with warnings.catch_warnings():
        # The generic SQL source is deliberate: the embedded server is reached by a socket path,
        # which the Postgres-specific source's URL validation does not accept.
        warnings.filterwarnings("ignore", message=".*generic SQLDatasource.*")
        source = context.data_sources.add_sql(name="warehouse", connection_string=url)
        asset = source.add_table_asset(name=table, table_name=table)
        batch = asset.add_batch_definition_whole_table("whole").get_batch()
    result = batch.validate(
        build_suite(ds, dataset_name, tokenised),
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": [ROW_NUMBER],
            "partial_unexpected_count": ROWS_IN_REPORT,
            "return_unexpected_index_query": False,
        },
    )
    outcomes = []
    row_count = 0
    for r in result.results:
        data = r.to_json_dict()
        config, res = data["expectation_config"], data.get("result") or {}
        kwargs = config.get("kwargs") or {}
        if config["type"] == "expect_table_row_count_to_be_between":
            row_count = int(res.get("observed_value") or 0)
        observed = res.get("observed_value") if config["type"].startswith("expect_table") else None
        outcomes.append(
            RuleOutcome(_rule_name(config), kwargs.get("column"), bool(data["success"]), int(res.get("unexpected_count") or 0), _rows(res), observed)
        )
    return ValidationReport(tuple(outcomes), row_count)


def sqlalchemy_url(libpq_url: str) -> str:
    """The psycopg2 SQLAlchemy URL great-expectations connects with."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", libpq_url)
