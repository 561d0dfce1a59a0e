{#- A query parameter, read from the request being served: its row of dcr_meta.query_requests, written under the
    collaboration's analysis lock before dbt builds the pre-noise view or a release reads it. Values are validated in
    Python (dcr_pipelines/lib/params.py) and stored as data, never as SQL text; the cast types them here. Reading them
    from a table, not from dbt vars, keeps dbt's partial parsing valid across requests and lets the view serve a new
    request without a rebuild. -#}
{% macro dcr_param(collaboration, query_name, name, sql_type) -%}
    (select cast(r.params ->> '{{ name }}' as {{ sql_type }}) from {{ dcr_requests(collaboration) }} as r
     where r.query_name = '{{ query_name }}')
{%- endmacro %}

{#- The request the view serves (parameters, uploads, cross-reference), written into every row. -#}
{% macro dcr_request_key(collaboration, query_name) -%}
    (select r.request_key from {{ dcr_requests(collaboration) }} as r
     where r.query_name = '{{ query_name }}')
{%- endmacro %}

{#- The operator's view of its collaboration's requests, in the collaboration's analysis schema (store/builder.py
    makes it; lib/naming.py analysis_schema names the schema). The builder reads it, never dcr_meta.query_requests:
    the builder's views are read by the operator, and row-level security on that table would judge the operator. -#}
{% macro dcr_requests(collaboration) -%}
    "{{ collaboration }}_analysis"."requests"
{%- endmacro %}
