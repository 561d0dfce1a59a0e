{#- Generated models name their schema exactly (demo_staging_retailer, ...);
    dbt's default would prefix the target schema. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {{ custom_schema_name if custom_schema_name else target.schema }}
{%- endmacro %}
