"""Typed models of a collaboration's policy files.

A collaboration is the folder ``policies/<name>/``: ``collaboration.yaml``
(members, datasets, rules, budgets, approvals) and ``queries/<q>.yaml`` +
``queries/<q>.sql`` (approved analyses). These models validate shape and
types; cross-references between them are checked in ``loader.py`` where the
line numbers are known.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ability(StrEnum):
    PROVIDE_DATA = "provide_data"
    RUN_QUERIES = "run_queries"
    RECEIVE_RESULTS = "receive_results"


class ColumnType(StrEnum):
    TEXT = "text"
    INTEGER = "integer"
    NUMERIC = "numeric"
    DATE = "date"
    TIMESTAMP = "timestamp"
    BOOLEAN = "boolean"

    @property
    def sql(self) -> str:
        return {"timestamp": "timestamp", "numeric": "numeric", "integer": "bigint"}.get(
            self.value, self.value
        )


class IdentifierKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CUSTOMER_ID = "customer_id"


class AggregateFunction(StrEnum):
    COUNT = "count"
    COUNT_DISTINCT = "count_distinct"
    SUM = "sum"
    SUM_DISTINCT = "sum_distinct"
    AVG = "avg"
    # Beyond AWS's default set: only if the owner lists them (MIN/MAX reveal one person's value).
    MIN = "min"
    MAX = "max"
    STDDEV = "stddev"
    VARIANCE = "variance"


class Member(Strict):
    display_name: str | None = None
    abilities: tuple[Ability, ...] = (Ability.PROVIDE_DATA,)
    contact: str | None = None


class EmailRules(Strict):
    """Normalisation of email identifiers: always trimmed and lowercased."""

    gmail_drop_dots: bool = False
    drop_plus_tag: bool = False


class IdentitySpec(Strict):
    """Which identifier kinds link people across parties, and how they are normalised.

    One kind (``kind``), or several with a match rule: ``any_of`` (people who share any of the identifiers are one
    person) or ``priority`` (a pair of parties' records matched by an earlier identifier is not matched again by a
    later one). docs/identifiers.md says how the records become one match_id per person.
    """

    kind: IdentifierKind = IdentifierKind.EMAIL
    any_of: tuple[IdentifierKind, ...] = ()
    priority: tuple[IdentifierKind, ...] = ()
    email: EmailRules = EmailRules()
    phone_default_country: str = "US"  # the numbering plan of numbers written without a country code (ISO 3166 region)
    customer_id_case: Literal["preserve", "lower", "upper"] = "preserve"

    @field_validator("phone_default_country")
    @classmethod
    def _known_region(cls, value: str) -> str:
        import phonenumbers

        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region with a numbering plan: an ISO 3166 code such as US, GB, DE, FR, IN, BR or JP")
        return value.upper()

    @model_validator(mode="after")
    def _one_rule(self) -> IdentitySpec:
        for rule in ("any_of", "priority"):
            kinds = getattr(self, rule)
            if kinds and "kind" in self.model_fields_set:
                raise ValueError(f"declare either 'kind' (one identifier) or '{rule}' (several), not both")
            if kinds and len(kinds) < 2:
                raise ValueError(f"'{rule}' lists at least two identifier kinds; for one, use 'kind: {kinds[0].value}'")
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"'{rule}' lists an identifier kind twice")
        if self.any_of and self.priority:
            raise ValueError("declare one match rule: 'any_of' or 'priority', not both")
        return self

    @property
    def kinds(self) -> tuple[IdentifierKind, ...]:
        """The identifier kinds people are matched on, in priority order."""
        return self.any_of or self.priority or (self.kind,)

    @property
    def rule(self) -> Literal["one", "any_of", "priority"]:
        return "any_of" if self.any_of else "priority" if self.priority else "one"


class MatchingSpec(Strict):
    client: Name | None = None
    buckets: int = Field(default=1, ge=1, le=1024)
    bucket_steps: bool = False  # one Dagster step per bucket (for a distributed executor) instead of a process pool in one step
    padding: bool = False
    # What members learn of the number of shared people: nothing, a DP count, or the exact count. Where ad-hoc
    # rules let a member count the shared people exactly, only "exact" is coherent (the loader refuses the others).
    overlap_release: Literal["withheld", "dp", "exact"] = "withheld"
    overlap_epsilon: float = Field(default=0.1, gt=0, le=10)  # per release of the overlap size
    overlap_budget: float = Field(default=1.0, gt=0)  # epsilon of all overlap releases in any 30 days
    home_parties: tuple[Name, ...] = ()
    # How long the parties' PSI keys live. "run": fresh keys for every match (nothing links across runs). A duration
    # ("12h", "7d"): the keys and every party's blinded set are kept for that long, and a new match blinds and compares
    # only the identities that changed (docs/operations.md says what the parties could link across runs of one epoch).
    key_epoch: str = "run"

    @field_validator("key_epoch", mode="before")
    @classmethod
    def _epoch_is_run_or_a_duration(cls, value: Any) -> str:
        """run, or at most a year in hours (1h-8760h) or days (1d-365d): the longer an epoch, the more a party could link."""
        match = re.fullmatch(r"run|([1-9][0-9]{0,3})([hd])", value) if isinstance(value, str) else None
        if match is None or (match.group(1) and int(match.group(1)) > (8760 if match.group(2) == "h" else 365)):
            raise ValueError(f"{value!r} is not a key epoch: use run, or a duration of at most a year in hours or days, such as 12h or 7d")
        return str(value)

    def key_epoch_seconds(self) -> int:
        """0 for "run", else the epoch's length in seconds."""
        if self.key_epoch == "run":
            return 0
        return int(self.key_epoch[:-1]) * (3600 if self.key_epoch.endswith("h") else 86400)


class FileFormat(Strict):
    type: Literal["csv", "parquet", "jsonl"] = "csv"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quote: str = Field(default='"', min_length=1, max_length=1)
    encoding: str = "utf-8"


class Column(Strict):
    type: ColumnType
    identifier: IdentifierKind | None = None
    nullable: bool = True
    unique: bool = False
    dimension: bool = False
    aggregate: tuple[AggregateFunction, ...] = ()
    join: bool = False
    list: bool = False
    allowed_values: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None
    max_null_fraction: float | None = Field(default=None, ge=0, le=1)
    max_invalid_fraction: float = Field(default=0.0, ge=0, le=1)
    description: str | None = None

    @model_validator(mode="after")
    def _roles_are_consistent(self) -> Column:
        if self.identifier is not None and (self.dimension or self.aggregate or self.list):
            raise ValueError("an identifier column cannot be a dimension, an aggregate or a list column")
        if self.join and self.identifier is None:
            raise ValueError("only identifier columns can be join columns (joins go through the cross-reference table)")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError("range must be [low, high] with low <= high")
        if self.aggregate and self.type not in (ColumnType.INTEGER, ColumnType.NUMERIC):
            functions = set(self.aggregate) - {AggregateFunction.COUNT, AggregateFunction.COUNT_DISTINCT}
            if functions:
                raise ValueError(f"only numeric columns can be summed or averaged, not {self.type.value}")
        return self


class RowFilter(Strict):
    column: Name
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_not_null"]
    value: Any = None


# Scalar functions an owner may allow in ad-hoc SQL (lib/ad_hoc.py maps each to its parsed forms).
SCALAR_FUNCTIONS = (
    "lower", "upper", "trim", "length", "substring", "concat", "round", "abs", "floor", "ceil",
    "coalesce", "greatest", "least", "date_trunc", "extract", "cast", "case",
)


class AnalysisRule(Strict):
    """What may be asked of a dataset.

    ``dp`` and ``custom``: only approved queries (``dp``: only differentially private ones).
    ``differential_privacy``: also ad-hoc SQL, answered with noise and charged to the runner's budget.
    ``aggregation`` (exact, thresholded) and ``list``: also ad-hoc SQL, checked against the column roles and these settings.
    """

    type: Literal["dp", "differential_privacy", "aggregation", "list", "custom"] = "dp"
    min_distinct_units: int = Field(default=0, ge=0)
    join_required: bool = True
    scalar_functions: tuple[str, ...] = ()
    join_operators: tuple[Literal["and", "or"], ...] = ("and",)
    # differential_privacy only: what one ad-hoc query costs and how far one person can move it.
    epsilon_per_query: float = Field(default=1.0, gt=0, le=10)
    max_groups_per_person: int = Field(default=1, ge=1, le=1000)
    max_rows_per_group: int = Field(default=1, ge=1, le=1000)  # COUNT(*) counts at most this many of a person's rows per group
    key_selection_delta: float = Field(default=1e-6, gt=0, lt=1e-3)  # groups without a public domain: DP key selection
    bounds: dict[Name, tuple[float, float]] = {}  # per person and group, for SUM and AVG; default: the column's range

    @field_validator("scalar_functions")
    @classmethod
    def _known_functions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in value if f.lower() not in SCALAR_FUNCTIONS]
        if unknown:
            raise ValueError(f"unknown scalar function(s) {', '.join(unknown)}; allowed: {', '.join(SCALAR_FUNCTIONS)}")
        return tuple(f.lower() for f in value)

    @field_validator("bounds")
    @classmethod
    def _finite_bounds(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for column, (low, high) in value.items():
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(f"bounds of {column} must be finite with low <= high")
        return value

    @property
    def ad_hoc(self) -> bool:
        return self.type in ("differential_privacy", "aggregation", "list")

    @property
    def exact(self) -> bool:
        """Ad-hoc answers without noise (thresholded): the aggregation and list rules."""
        return self.type in ("aggregation", "list")


class RowBounds(Strict):
    min: int = Field(default=1, ge=0)
    max: int | None = Field(default=None, ge=1)


class ExtraExpectation(Strict):
    """A great-expectations expectation a data owner adds to the contract, e.g. expect_column_mean_to_be_between."""

    type: Annotated[str, Field(pattern=r"^expect_[a-z0-9_]+$")]
    kwargs: dict[str, Any] = {}


class Dataset(Strict):
    owner: Name
    description: str | None = None
    format: FileFormat = FileFormat()
    unknown_columns: Literal["reject", "ignore"] = "reject"
    # replace: each accepted file is the whole dataset; append: each accepted file adds its rows (a Dagster partition).
    mode: Literal["replace", "append"] = "replace"
    rows: RowBounds = RowBounds()
    # Exact repeats of an earlier row: keep them (counted), drop the extra copies, or reject a file that has any.
    duplicates: Literal["keep", "drop", "reject"] = "keep"
    # The share of rows that repeat an earlier row (extra copies only), checked after `duplicates: drop`.
    max_duplicate_fraction: float | None = Field(default=None, ge=0, le=1)
    expectations: tuple[ExtraExpectation, ...] = ()
    columns: dict[Name, Column]
    shared: tuple[Name, ...] | None = None
    row_filters: tuple[RowFilter, ...] = ()
    analysis_rule: AnalysisRule = AnalysisRule()

    @field_validator("columns")
    @classmethod
    def _not_empty(cls, value: dict[str, Column]) -> dict[str, Column]:
        if not value:
            raise ValueError("a dataset declares at least one column")
        return value

    @property
    def identifier_columns(self) -> dict[str, Column]:
        return {n: c for n, c in self.columns.items() if c.identifier is not None}

    @property
    def shared_columns(self) -> tuple[str, ...]:
        """Non-identifier columns that leave the raw schema (default: all of them)."""
        if self.shared is not None:
            return self.shared
        return tuple(n for n, c in self.columns.items() if c.identifier is None)


class Budget(Strict):
    consumer: Name
    epsilon: float = Field(gt=0)
    delta: float = Field(default=0.0, ge=0, lt=1)
    period_days: int | None = Field(default=None, ge=1)
    # Warn (budget sensor, run tag, log) once the remaining epsilon falls under this; default a fifth of the budget.
    warn_below: float | None = Field(default=None, ge=0)

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("epsilon must be finite")
        return value

    @model_validator(mode="after")
    def _warning_under_budget(self) -> Budget:
        if self.warn_below is not None and self.warn_below >= self.epsilon:
            raise ValueError(f"warn_below ({self.warn_below:g}) must be under the budget's epsilon ({self.epsilon:g})")
        return self

    @property
    def warning_level(self) -> float:
        return self.epsilon / 5 if self.warn_below is None else self.warn_below


class Approval(Strict):
    member: Name
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Schedule(Strict):
    name: Name
    cron: str
    target: Literal["matching", "queries", "all"] = "all"


class DifferenceChecks(Strict):
    """Withhold a thresholded row whose people differ from an earlier released row's by 1 to threshold - 1.

    Applies to ad-hoc results and threshold-rule releases; all runners of the collaboration count as one adversary.
    """

    enabled: bool = True
    retention_days: int = Field(default=365, ge=1, le=36500)


class AdHocLimits(Strict):
    max_queries_per_day: int | None = Field(default=None, ge=1)  # per runner, accepted runs in any 24 hours


class Collaboration(Strict):
    name: Name
    description: str | None = None
    members: dict[Name, Member]
    identity: IdentitySpec = IdentitySpec()
    matching: MatchingSpec = MatchingSpec()
    datasets: dict[Name, Dataset]
    budgets: tuple[Budget, ...] = ()
    approvals: dict[Name, tuple[Approval, ...]] = {}
    schedules: tuple[Schedule, ...] = ()
    difference_checks: DifferenceChecks = DifferenceChecks()
    ad_hoc: AdHocLimits = AdHocLimits()


# --- approved queries -------------------------------------------------------


class ParameterType(StrEnum):
    TEXT = "text"
    INTEGER = "integer"
    NUMERIC = "numeric"
    DATE = "date"
    BOOLEAN = "boolean"


class Parameter(Strict):
    type: ParameterType
    default: Any = None
    allowed: tuple[Any, ...] | None = None
    min: Any = None
    max: Any = None
    description: str | None = None


class Dimension(Strict):
    """A released group key: a public domain, or DP key selection with a delta."""

    domain: tuple[str, ...] | None = None
    key_selection_delta: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source(self) -> Dimension:
        if self.domain is not None and self.key_selection_delta is not None:
            raise ValueError("a dimension declares either a public 'domain' or a 'key_selection_delta', not both")
        if self.domain is not None and len(set(self.domain)) != len(self.domain):
            raise ValueError("domain values must be unique")
        return self


class MetricKind(StrEnum):
    COUNT = "count"
    COUNT_UNITS = "count_units"
    SUM = "sum"
    AVG = "avg"


class Metric(Strict):
    aggregate: MetricKind
    column: Name | None = None
    bounds: tuple[float, float] | None = None
    epsilon_share: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _bounded(self) -> Metric:
        needs_column = self.aggregate in (MetricKind.SUM, MetricKind.AVG)
        if needs_column and (self.column is None or self.bounds is None):
            raise ValueError(f"{self.aggregate.value} needs a 'column' and clamping 'bounds'")
        if not needs_column and self.column is not None:
            raise ValueError(f"{self.aggregate.value} takes no column")
        if self.bounds is not None:
            low, high = self.bounds
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError("bounds must be finite with low <= high")
        return self


class Contribution(Strict):
    max_groups_per_unit: int = Field(default=1, ge=1)
    max_rows_per_group: int = Field(default=1, ge=1)


class Privacy(Strict):
    epsilon: float = Field(gt=0)
    delta: float = Field(default=0.0, ge=0, lt=1)


class QuerySpec(Strict):
    description: str | None = None
    rule: Literal["dp", "threshold"] = "dp"
    sql: str | None = None
    consumer: Name
    receivers: tuple[Name, ...]
    parameters: dict[Name, Parameter] = {}
    dimensions: dict[Name, Dimension]
    metrics: dict[Name, Metric]
    contribution: Contribution = Contribution()
    privacy: Privacy | None = None
    min_distinct_units: int = Field(default=0, ge=0)
    # The parties whose shared people the query reads (its datasets' owners among them); empty: every party.
    parties: tuple[Name, ...] = ()
    # on_demand: released only when someone asks (dcr release, a UI materialization with its config);
    # scheduled: also by the policy's schedules, with the default parameters.
    release: Literal["on_demand", "scheduled"] = "on_demand"

    @model_validator(mode="after")
    def _rule_needs_settings(self) -> QuerySpec:
        if self.rule == "dp" and self.privacy is None:
            raise ValueError("a query under the dp rule declares 'privacy: {epsilon: ...}'")
        if self.rule == "dp":
            for name, dim in self.dimensions.items():
                if dim.domain is None and dim.key_selection_delta is None:
                    raise ValueError(f"dimension {name!r} of a dp query declares a public 'domain' or a 'key_selection_delta'")
        if self.rule == "threshold":
            if self.privacy is not None:
                raise ValueError("a threshold query takes no 'privacy' settings (use rule: dp)")
            if self.min_distinct_units < 1:
                raise ValueError("a threshold query declares 'min_distinct_units' (at least 1)")
            if any(d.key_selection_delta is not None for d in self.dimensions.values()):
                raise ValueError("key_selection_delta is a dp setting; a threshold query's groups are thresholded instead")
        if not self.metrics:
            raise ValueError("a query declares at least one metric")
        if not self.dimensions:
            raise ValueError("a query declares at least one dimension (a group key of its output)")
        return self


IDENT_RE = re.compile(NAME_PATTERN)
