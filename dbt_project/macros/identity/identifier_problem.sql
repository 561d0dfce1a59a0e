{#- Why an identifier could not be normalised; NULL when it was. Consistent
    with dcr_normalise_identifier by construction: any identifier whose
    normalised value is NULL gets a reason. Reasons are counted per dataset
    and reported; such rows are never matched. -#}
{% macro dcr_identifier_problem(raw, kind, normalised) -%}
    {{ return(adapter.dispatch('dcr_identifier_problem', 'dcr')(raw, kind, normalised)) }}
{%- endmacro %}

{% macro postgres__dcr_identifier_problem(raw, kind, normalised) -%}
    {%- set trimmed = "btrim(" ~ raw ~ ", ' ' || chr(9) || chr(10) || chr(13))" -%}
    case
        when {{ raw }} is null or {{ trimmed }} = '' then 'missing'
        when {{ normalised }} is not null then null
        else 'invalid_{{ kind }}'
    end
{%- endmacro %}
