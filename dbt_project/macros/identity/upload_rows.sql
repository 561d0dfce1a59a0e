{#-
    The rows of an append-mode dataset, each with the upload table (part) it came from in ``_dcr_part``.
    Built in full, the model reads every current part; built incrementally, only the parts it does not hold
    yet. The dataset's view (``source_relation``, its dbt source and lineage) is the union of the same parts.
    A part the model holds that is no longer current (a withdrawn upload) cannot be taken back incrementally:
    that is an error here, and the staging stage asks for a full refresh before it comes to this.
-#}
{% macro dcr_upload_rows(source_relation, collab, party, dataset, columns) %}
  {%- set cols = [] -%}
  {%- for c in columns %}{% do cols.append(adapter.quote(c)) %}{% endfor -%}
  {%- if not execute -%}
    select {{ cols | join(', ') }}, ''::text as _dcr_part from {{ source_relation }}
  {%- else -%}
    {%- set current = run_query(
        "select unnest(parts) from dcr_meta.dataset_versions where collaboration = '" ~ collab ~ "' and party = '" ~ party
        ~ "' and dataset = '" ~ dataset ~ "' and is_current").columns[0].values() | list -%}
    {%- set held = [] -%}
    {%- if is_incremental() -%}
      {%- set held = run_query("select distinct _dcr_part from " ~ this).columns[0].values() | list -%}
      {%- for part in held if part not in current -%}
        {{ exceptions.raise_compiler_error("upload table " ~ part ~ " of " ~ this ~ " is no longer current: build it with --full-refresh") }}
      {%- endfor -%}
    {%- endif -%}
    {%- set todo = [] -%}
    {%- for part in current if part not in held %}{% do todo.append(part) %}{% endfor -%}
    {%- if todo | length == 0 -%}
    select {{ cols | join(', ') }}, ''::text as _dcr_part from {{ source_relation }} where false
    {%- else -%}
      {%- for part in todo %}
    select {{ cols | join(', ') }}, '{{ part }}'::text as _dcr_part from {{ adapter.quote(source_relation.schema) }}.{{ adapter.quote(part) }}
        {%- if not loop.last %}
    union all
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
  {%- endif -%}
{% endmacro %}
