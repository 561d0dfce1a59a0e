{#- A query parameter as a typed SQL literal. Values are validated in Python
    (dcr_pipelines/lib/params.py) before dbt runs; this macro still quotes
    every value as a string literal and casts it, so even an unvalidated
    value could not change the statement. -#}
{% macro dcr_param(query_name, name, sql_type) -%}
    {%- set params = var('dcr_params', {}).get(query_name, {}) -%}
    {%- if name not in params -%}
        {%- if execute -%}
            {{ exceptions.raise_compiler_error("parameter " ~ name ~ " of query " ~ query_name ~ " was not supplied") }}
        {%- endif -%}
        cast(null as {{ sql_type }})
    {%- else -%}
        cast('{{ (params[name] | string).replace("'", "''") }}' as {{ sql_type }})
    {%- endif -%}
{%- endmacro %}
