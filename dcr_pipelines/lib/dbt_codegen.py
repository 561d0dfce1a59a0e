"""Generate a collaboration's dbt models from its policy.

Policy is the single source of truth: the normalised, staging, identity,
matched-view and query models of every collaboration are rendered from the
Jinja templates in ``lib/templates/`` into the deployment's dbt project
(``$DCR_HOME/dbt/policies-<hash>/models/collaborations/<collab>/``, see defs/dbt_project.py) and parsed
into one manifest; the demo collaborations' output is committed under
``dbt_project/golden/`` for review. The SQL logic itself lives in
hand-written macros under ``dbt_project/macros``; generated files only wire
policy values into them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import sqlglot
from sqlglot import exp

from . import naming as n
from .identifiers import TOKEN_PATTERN
from .matching import bucket_sql
from .policy import ApprovedQuery, LoadedCollaboration
from .policy.models import Dataset, ParameterType, RowFilter
from .settings import PROJECT_ROOT

GENERATED_DIR = Path("models") / "collaborations"
_PARAM_SQL_TYPES = {
    ParameterType.TEXT: "text",
    ParameterType.INTEGER: "bigint",
    ParameterType.NUMERIC: "numeric",
    ParameterType.DATE: "date",
    ParameterType.BOOLEAN: "boolean",
}


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("dcr_pipelines.lib", "templates"),
    # The output is dbt Jinja: our own tags are [[ ]], [% %] and [# #], so {{ }} and {% %} pass through for dbt.
    variable_start_string="[[", variable_end_string="]]",
    block_start_string="[%", block_end_string="%]",
    comment_start_string="[#", comment_end_string="#]",
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # noqa: S701 (renders SQL, not HTML; every value is an identifier from the validated policy or a quoted literal)
)


def _render(template: str, **values: Any) -> str:
    """One model from its template; the template's leading comment line is not part of the output."""
    return _TEMPLATES.get_template(template).render(**values).lstrip("\n")


def jinja_safe(text: str) -> str:
    """Policy text as dbt will read it: every brace becomes Jinja that prints that brace, so no value from a policy can
    open a template tag (``{{``, ``{%``, ``{#``) however it is written. The policy check refuses such text anyway."""
    return re.sub(r"[{}]", lambda m: "{{ '" + m.group(0) + "' }}", text)


def _literal(value: Any) -> str:
    """A policy value as a SQL literal, quoted by sqlglot and safe from dbt's Jinja."""
    if isinstance(value, bool):
        return exp.Boolean(this=value).sql(dialect="postgres")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return exp.Literal.number(value).sql(dialect="postgres")
    return jinja_safe(exp.Literal.string(str(value)).sql(dialect="postgres"))


def _config(distributed_by: str | None = None, **kwargs: Any) -> str:
    """A model's config; ``distributed_by`` (a column) is declared only for an MPP adapter that supports it
    (dbt-greenplum, for Greenplum 7 / Apache Cloudberry), so dbt-postgres never sees an unknown key."""
    parts = ", ".join(f"{k}={json.dumps(v)}" for k, v in kwargs.items())
    out = "{{ config(" + parts + ") }}"
    if distributed_by:
        out += "{% if target.type == 'greenplum' %}{{ config(distributed_by=" + json.dumps(f'"{distributed_by}"') + ") }}{% endif %}"
    return out


def _meta(collab: str, key: list[str], owner: str | None, stage: str) -> dict[str, Any]:
    meta = {"collaboration": collab, "asset_key": key, "stage": stage}
    if owner is not None:  # JSON null would be Jinja's Undefined
        meta["owner"] = owner
    return {"dcr": meta}


def row_filter_sql(flt: RowFilter) -> str:
    """A structured policy row filter as a SQL predicate (values quoted, never spliced)."""
    column = f'"{flt.column}"'
    if flt.op == "is_not_null":
        return f"{column} is not null"
    if flt.op in ("in", "not_in"):
        values = flt.value if isinstance(flt.value, list) else [flt.value]
        keyword = "in" if flt.op == "in" else "not in"
        return f"{column} {keyword} ({', '.join(_literal(v) for v in values)})"
    return f"{column} {flt.op} {_literal(flt.value)}"


def identifier_options(loaded: LoadedCollaboration, kind: str) -> dict[str, Any]:
    identity = loaded.collaboration.identity
    if kind == "email":
        return {"gmail_drop_dots": identity.email.gmail_drop_dots, "drop_plus_tag": identity.email.drop_plus_tag}
    if kind == "phone":
        return {"region": identity.phone_default_country.upper()}
    return {"case": identity.customer_id_case}


def normalised_sql(loaded: LoadedCollaboration, dataset_name: str, ds: Dataset) -> str:
    """Party-private: each identifier normalised, why not (if not), and its keyed token; shared columns."""
    c, p = loaded.name, ds.owner
    id_cols = {col: spec.identifier.value for col, spec in ds.identifier_columns.items() if spec.identifier is not None}
    identifiers = [{"name": col, "kind": kind, "token": n.token_column(col), "options": json.dumps(identifier_options(loaded, kind)),
                    "region": identifier_options(loaded, kind).get("region", "")}
                   for col, kind in id_cols.items()]
    return _render(
        "tokenised.sql.j2" if loaded.at_home(p) else "normalised.sql.j2",
        config=_normalised_config(loaded, dataset_name, ds),
        raw_schema=n.raw_schema(c, p),
        dataset=dataset_name,
        party=p,
        collab=c,
        incremental=incremental(loaded, ds),
        columns=json.dumps(list(ds.columns)),
        identifiers=identifiers,
        shared=list(ds.shared_columns),
        where=" and ".join(row_filter_sql(f) for f in ds.row_filters) or "true",
        token_pattern=TOKEN_PATTERN,
    )


def incremental(loaded: LoadedCollaboration, ds: Dataset) -> bool:
    """An append-mode dataset tokenised here is normalised upload by upload: a new upload hashes only its own rows."""
    return ds.mode == "append" and not loaded.at_home(ds.owner)


def _normalised_config(loaded: LoadedCollaboration, dataset_name: str, ds: Dataset) -> str:
    """The config block of a party's private ``<dataset>__normalised`` model, whether it tokenises here or arrives tokenised."""
    c, p = loaded.name, ds.owner
    # an incremental model built before a column was added gets the column (null in its earlier rows) instead of failing
    return _config(
        **({"materialized": "incremental", "on_schema_change": "append_new_columns"} if incremental(loaded, ds) else {}),
        schema=n.raw_schema(c, p),
        alias=f"{dataset_name}__normalised",
        tags=[f"dcr_{c}", "dcr_staging"],
        meta=_meta(c, n.normalised_key(c, dataset_name), p, "staging"),
        distributed_by=n.token_column(matching_column(loaded, ds)),
    )


def staging_sql(loaded: LoadedCollaboration, dataset_name: str, ds: Dataset) -> str:
    c, p = loaded.name, ds.owner
    match_col = matching_column(loaded, ds)
    return _render(
        "staging.sql.j2",
        config=_config(
            schema=n.staging_schema(c, p),
            alias=dataset_name,
            tags=[f"dcr_{c}", "dcr_staging"],
            meta=_meta(c, n.staging_key(c, dataset_name), p, "staging"),
            distributed_by=n.token_column(match_col),
        ),
        columns=[n.token_column(col) for col in ds.identifier_columns] + list(ds.shared_columns),
        normalised_model=n.normalised_model(c, p, dataset_name),
        match_tokens=[n.token_column(col) for _, col in matching_columns(loaded, ds)],
    )


def matching_columns(loaded: LoadedCollaboration, ds: Dataset) -> list[tuple[str, str]]:
    """(kind, column) of each identifier kind the collaboration matches on that the dataset has, in priority order
    (a dataset's first column of a kind)."""
    out = []
    for kind in loaded.collaboration.identity.kinds:
        col = next((col for col, spec in ds.columns.items() if spec.identifier == kind), None)
        if col is not None:
            out.append((kind.value, col))
    return out


def matching_column(loaded: LoadedCollaboration, ds: Dataset) -> str:
    """The dataset's column of the first identifier kind it has (the only one with one kind)."""
    return matching_columns(loaded, ds)[0][1]


def identities_sql(loaded: LoadedCollaboration, party: str) -> str:
    c = loaded.name
    if loaded.graph_matching():
        return _identity_records_sql(loaded, party)
    datasets = []
    for name, ds in loaded.collaboration.datasets.items():
        if ds.owner == party:
            col = matching_column(loaded, ds)
            datasets.append({"token": n.token_column(col), "column": col, "model": n.normalised_model(c, party, name)})
    spec = loaded.collaboration.matching
    steps = {"indexes": [{"columns": ["bucket"]}]} if spec.bucket_steps else {}  # each bucket step reads its rows by index
    return _render(
        "identities.sql.j2",
        config=_config(
            schema=n.raw_schema(c, party),
            alias="identities",
            tags=[f"dcr_{c}", "dcr_staging"],
            meta=_meta(c, n.identities_key(c, party), party, "staging"),
            distributed_by="token",
            **steps,
        ),
        datasets=datasets,
        bucket=bucket_sql('"identifier"', spec.buckets) if spec.bucket_steps else None,
    )


def _identity_records_sql(loaded: LoadedCollaboration, party: str) -> str:
    """Several identifiers or party subsets: the party's distinct identity records, a token and identifier per kind."""
    c = loaded.name
    kinds = [k.value for k in loaded.collaboration.identity.kinds]
    datasets = []
    for name, ds in loaded.collaboration.datasets.items():
        if ds.owner == party:
            have = dict(matching_columns(loaded, ds))
            datasets.append({"model": n.normalised_model(c, party, name),
                             "columns": [{"kind": k, "token": n.token_column(have[k]) if k in have else None, "column": have.get(k)} for k in kinds]})
    return _render(
        "identity_records.sql.j2",
        config=_config(
            schema=n.raw_schema(c, party),
            alias="identities",
            tags=[f"dcr_{c}", "dcr_staging"],
            meta=_meta(c, n.identities_key(c, party), party, "staging"),
        ),
        datasets=datasets,
    )


def overlap_of(loaded: LoadedCollaboration, subset: tuple[str, ...]) -> str:
    """The name suffix of one set of parties' cross-reference, links and matched views."""
    return n.overlap_suffix(subset, loaded.parties())


def matched_sql(loaded: LoadedCollaboration, dataset_name: str, ds: Dataset, subset: tuple[str, ...] | None = None) -> str:
    c, p = loaded.name, ds.owner
    overlap = overlap_of(loaded, subset or loaded.parties())
    graph = loaded.graph_matching()
    return _render(
        "matched.sql.j2",
        config=_config(
            schema=n.analysis_schema(c),
            alias=f"matched_{dataset_name}{overlap}",
            materialized="view",
            tags=[f"dcr_{c}", "dcr_analysis"],
            meta=_meta(c, n.matched_key(c, dataset_name, overlap), None, "analysis"),
        ),
        shared=list(ds.shared_columns),
        staging_model=n.staging_model(c, p, dataset_name),
        matching_schema=n.matching_schema(c),
        xref=matching_relation(loaded, n.cross_reference_table(overlap)),
        links=matching_relation(loaded, n.links_table(overlap)) if graph else None,
        party=p,
        party_token=n.party_token_column(p),
        match_token=n.token_column(matching_column(loaded, ds)),
        link_columns=[{"kind": k.value, "token": n.token_column(have[k.value]) if k.value in have else None}
                      for have in [dict(matching_columns(loaded, ds))] for k in loaded.collaboration.identity.kinds],
        others=_real_matches_only(loaded, p),
    )


def _real_matches_only(loaded: LoadedCollaboration, party: str) -> list[list[dict[str, str]]]:
    """With padding: per other party, its staging tables; a row is real when its token exists in one of them (fake rows never do)."""
    if not loaded.collaboration.matching.padding:
        return []
    c = loaded.name
    return [
        [{"model": n.staging_model(c, other, name), "token": n.token_column(matching_column(loaded, ds)), "party_token": n.party_token_column(other)}
         for name, ds in loaded.collaboration.datasets.items() if ds.owner == other]
        for other in loaded.parties() if other != party
    ]


def rewrite_query(loaded: LoadedCollaboration, query: ApprovedQuery) -> str:
    """The approved SQL with logical dataset names bound to matched views and ``:params`` to typed literals."""
    tree = sqlglot.parse_one(query.sql, read="postgres")
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}

    def transform(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Table) and node.name not in ctes:
            alias = node.alias or node.name
            return exp.to_table(f"dcr_ref__{node.name}").as_(alias)
        if isinstance(node, exp.Placeholder):
            return exp.column(f"dcr_param__{node.name}")
        return node

    # Re-generated from the parsed tree (comments kept for reviewers, neutralised by sqlglot), every brace made inert
    # for dbt's Jinja before the only template calls, ref() and dcr_param(), are put in from names the policy validated.
    rendered = jinja_safe(tree.transform(transform).sql(dialect="postgres", pretty=True))
    overlap = overlap_of(loaded, loaded.query_parties(query))
    rendered = re.sub(r"\bdcr_ref__(\w+)", lambda m: f"{{{{ ref('{n.matched_model(loaded.name, m.group(1), overlap)}') }}}}", rendered)

    def param(match: re.Match[str]) -> str:
        name = match.group(1)
        sql_type = _PARAM_SQL_TYPES[query.spec.parameters[name].type]
        return f"{{{{ dcr_param('{loaded.name}', '{query.name}', '{name}', '{sql_type}') }}}}"

    return re.sub(r"\bdcr_param__(\w+)", param, rendered)


def query_sql(loaded: LoadedCollaboration, query: ApprovedQuery) -> str:
    """Pre-noise aggregates: domain filter, contribution bounds, clamping, then one row per group."""
    c, spec = loaded.name, query.spec
    dims = list(spec.dimensions)
    domain_filters = [f'"{d}" in ({", ".join(_literal(v) for v in dim.domain)})' for d, dim in spec.dimensions.items() if dim.domain is not None]
    metrics = []
    for metric_name, metric in spec.metrics.items():
        bounds = metric.bounds or (0, 0)
        metrics.append({"name": metric_name, "aggregate": metric.aggregate.value, "column": metric.column, "low": repr(bounds[0]), "high": repr(bounds[1])})
    return _render(
        "query.sql.j2",
        config=_config(
            schema=n.analysis_schema(c),
            alias=f"query_{query.name}",
            # A view: a request with other parameters only rewrites its row of the requests (dcr_meta.query_requests), which the view
            # reads (macro dcr_param); nothing is rebuilt unless the model itself changed (model_digest).
            materialized="view",
            tags=[f"dcr_{c}", "dcr_analysis"],
            meta=_meta(c, n.analysis_key(c, query.name), None, "analysis"),
        ),
        collab=c,
        query=query.name,
        approved_sql=rewrite_query(loaded, query),
        domain_filter=" and ".join(domain_filters) or "true",
        dims_json=json.dumps(dims),
        dim_list=", ".join(f'"{d}"' for d in dims),
        max_rows_per_group=spec.contribution.max_rows_per_group,
        max_groups_per_unit=spec.contribution.max_groups_per_unit,
        metrics=metrics,
        # threshold queries: the release removes groups under the minimum of distinct people, and withholds
        # groups whose people nearly equal a released group's (difference checks)
        thresholded=spec.rule == "threshold",
        matching_schema=n.matching_schema(c),
        xref=matching_relation(loaded, n.cross_reference_table(overlap_of(loaded, loaded.query_parties(query)))),
    )


MACROS = PROJECT_ROOT / "dbt_project" / "macros"


def model_digest(loaded: LoadedCollaboration, query: ApprovedQuery) -> str:
    """What a query's pre-noise view is made of: its generated model and the hand-written macros it compiles with.
    Recorded when dbt builds the view; a release whose model has another digest (a new policy or a new version of
    this code, not yet built) has dbt build it first."""
    h = hashlib.sha256(query_sql(loaded, query).encode())
    for path in sorted(MACROS.rglob("*.sql")):
        h.update(path.relative_to(MACROS).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _test(name: str, description: str, **arguments: Any) -> dict[str, Any]:
    """A dbt data test with its description (dbt's own field, and ``meta.description``, which dagster-dbt shows on the asset check)."""
    return {name: {**arguments, "description": description, "config": {"meta": {"description": description}}}}


def schema_yml(loaded: LoadedCollaboration) -> dict[str, Any]:
    """Sources (uploads, cross-reference) and tests as asset checks on every generated model."""
    c = loaded.name
    collab = loaded.collaboration
    sources: list[dict[str, Any]] = []
    for party in loaded.parties():
        tables = [
            {"name": name, "meta": {"dcr": {"asset_key": n.raw_key(c, name)}}}
            for name, ds in collab.datasets.items()
            if ds.owner == party
        ]
        sources.append({"name": n.raw_schema(c, party), "schema": n.raw_schema(c, party), "tables": tables})
    sources.append(
        {
            "name": n.matching_schema(c),
            "schema": n.matching_schema(c),
            "tables": [{"name": "cross_reference", "meta": {"dcr": {"asset_key": n.cross_reference_key(c)}}}],
        }
    )
    models: list[dict[str, Any]] = []
    for name, ds in collab.datasets.items():
        match_col = matching_column(loaded, ds)
        token = n.token_column(match_col)
        token_tests: list[Any] = []
        if len(matching_columns(loaded, ds)) == 1:  # with several, a row may have any of them
            token_tests.append(_test("not_null", f"Every row of {ds.owner}'s secure {name} has a keyed {token} to match on."))
        if ds.columns[match_col].unique:
            token_tests.append(_test("unique", f"{token} is unique in {ds.owner}'s {name}, as its contract declares {match_col} unique."))
        allowed = [n.token_column(col) for col in ds.identifier_columns] + list(ds.shared_columns)
        models.append(
            {
                "name": n.staging_model(c, ds.owner, name),
                "description": f"Secure table of {ds.owner}'s {name}: shared columns and keyed tokens only.",
                "data_tests": [_test("dcr_only_columns", f"Only shared columns and keyed tokens of {ds.owner}'s {name} leave its raw "
                                     "schema: no raw identifier, no undeclared column (privacy-critical, blocks what is downstream).",
                                     allowed=allowed)],
                "columns": [{"name": token, "data_tests": token_tests}],
            }
        )
        models.append(
            {
                "name": n.normalised_model(c, ds.owner, name),
                "description": f"{ds.owner}'s {name} with identifiers normalised and tokenised (party-private).",
            }
        )
        for subset in _overlaps_of(loaded, ds.owner):
            overlap = overlap_of(loaded, subset)
            models.append(
                {
                    "name": n.matched_model(c, name, overlap),
                    "description": f"{name} joined to the cross-reference{' of ' + ', '.join(subset) if overlap else ''}: match_id and shared columns.",
                    "columns": [{"name": "match_id", "data_tests": [_test("not_null", f"Every matched row of {name} carries a match_id from the cross-reference.")]}],
                }
            )
    for party in loaded.parties():
        if loaded.at_home(party):
            continue
        if loaded.graph_matching():
            models.append({"name": n.identities_model(c, party),
                           "description": f"{party}'s distinct identity records, a token and normalised identifier per kind: the PSI input (party-private)."})
            continue
        models.append(
            {
                "name": n.identities_model(c, party),
                "description": f"{party}'s distinct (token, normalised identifier) pairs: the PSI input (party-private).",
                "columns": [{"name": "token", "data_tests": [_test("not_null", f"Every PSI input token of {party} is set."),
                                                             _test("unique", f"Each PSI input token of {party} appears once (one row per person).")]}],
            }
        )
    for query in loaded.queries.values():
        models.append(
            {
                "name": n.query_model(c, query.name),
                "description": f"Pre-noise, contribution-bounded aggregates of query {query.name} (never released as is).",
            }
        )
    return {"version": 2, "sources": sources, "models": models}


def _overlaps_of(loaded: LoadedCollaboration, party: str) -> list[tuple[str, ...]]:
    """The sets of parties with a cross-reference that ``party`` is in (every party first)."""
    return [s for s in loaded.overlaps() if party in s]


def matching_relation(loaded: LoadedCollaboration, table: str) -> str:
    """How a model names one of the matching schema's tables. The cross-reference asset writes them all; dbt sources
    map one to one to asset keys, so only ``cross_reference`` is a source and the others are named directly (their
    models also name the source in a ``depends_on`` comment, so the lineage stays)."""
    schema = n.matching_schema(loaded.name)
    return f"{{{{ source('{schema}', 'cross_reference') }}}}" if table == "cross_reference" else f'"{schema}"."{table}"'


def render(loaded: LoadedCollaboration) -> dict[Path, str]:
    """Relative path -> file content for one collaboration."""
    c = loaded.name
    files: dict[Path, str] = {}
    for name, ds in loaded.collaboration.datasets.items():
        files[Path("staging") / f"{n.normalised_model(c, ds.owner, name)}.sql"] = normalised_sql(loaded, name, ds)
        files[Path("staging") / f"{n.staging_model(c, ds.owner, name)}.sql"] = staging_sql(loaded, name, ds)
        for subset in _overlaps_of(loaded, ds.owner):
            files[Path("analysis") / f"{n.matched_model(c, name, overlap_of(loaded, subset))}.sql"] = matched_sql(loaded, name, ds, subset)
    for party in loaded.parties():
        if loaded.at_home(party):  # its PSI input is its setup message, made at home
            continue
        files[Path("staging") / f"{n.identities_model(c, party)}.sql"] = identities_sql(loaded, party)
    for query in loaded.queries.values():
        files[Path("analysis") / f"{n.query_model(c, query.name)}.sql"] = query_sql(loaded, query)
    files[Path("_collaboration.yml")] = json.dumps(schema_yml(loaded), indent=2) + "\n"
    return files


def write_rendered(folder: Path, files: dict[Path, str]) -> None:
    """Write one collaboration's rendered models under ``folder`` (a review copy, or the dbt project's models)."""
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def write_models(dbt_project: Path, collaborations: Iterable[LoadedCollaboration]) -> str:
    """Regenerate every collaboration's models; return a hash of what was written."""
    root = dbt_project / GENERATED_DIR
    rendered = {c.name: render(c) for c in collaborations}
    digest = hashlib.sha256()
    for collab_name in sorted(rendered):
        for rel, content in sorted(rendered[collab_name].items()):
            digest.update(f"{collab_name}/{rel}\0{content}\0".encode())
    stamp = root / ".dcr_models.sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest.hexdigest():
        return digest.hexdigest()  # already written: a running process may be reading these files
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for collab_name, files in rendered.items():
        write_rendered(tmp / collab_name, files)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / stamp.name).write_text(digest.hexdigest() + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return digest.hexdigest()

