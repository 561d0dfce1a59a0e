{#- A query parameter, read from the request being built (dcr_meta.query_requests,
    written just before dbt runs, under the collaboration's analysis lock).
    Values are validated in Python (dcr_pipelines/lib/params.py) and stored as
    data, never as SQL text; the cast types them here. Reading them from a
    table, not from dbt vars, keeps dbt's partial parsing valid across requests. -#}
{% macro dcr_param(collaboration, query_name, name, sql_type) -%}
    (select cast(r.params ->> '{{ name }}' as {{ sql_type }}) from dcr_meta.query_requests as r
     where r.collaboration = '{{ collaboration }}' and r.query_name = '{{ query_name }}')
{%- endmacro %}

{#- The request the table is built for (parameters, uploads, cross-reference), written into every row. -#}
{% macro dcr_request_key(collaboration, query_name) -%}
    (select r.request_key from dcr_meta.query_requests as r
     where r.collaboration = '{{ collaboration }}' and r.query_name = '{{ query_name }}')
{%- endmacro %}
