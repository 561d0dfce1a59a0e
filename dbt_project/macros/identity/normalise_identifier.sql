{#- Normalise an identifier column by kind; returns NULL when it cannot be
    normalised, so the row is counted as rejected rather than matched as garbage.
    The spec is documented in docs/identifiers.md and mirrored by
    dcr_pipelines/lib/identifiers.py, whose tests pin both. -#}
{% macro dcr_normalise_identifier(column, kind, options) -%}
    {{ return(adapter.dispatch('dcr_normalise_identifier', 'dcr')(column, kind, options)) }}
{%- endmacro %}

{% macro postgres__dcr_normalise_identifier(column, kind, options) -%}
{%- if kind == 'email' -%}
    {%- set e = dcr_lower("btrim(" ~ column ~ ", ' ' || chr(9) || chr(10) || chr(13))") -%}
    {%- set local = "split_part(" ~ e ~ ", '@', 1)" -%}
    {%- set domain = "split_part(" ~ e ~ ", '@', 2)" -%}
    {%- if options.get('drop_plus_tag') -%}
        {%- set local = "split_part(" ~ local ~ ", '+', 1)" -%}
    {%- endif -%}
    {%- if options.get('gmail_drop_dots') -%}
        {%- set local = "case when " ~ domain ~ " in ('gmail.com', 'googlemail.com') then replace(" ~ local ~ ", '.', '') else " ~ local ~ " end" -%}
    {%- endif -%}
    {#- ASCII white space only (POSIX [:space:] would follow the server's locale) -#}
    {%- set part = "[^@ ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13) || ']+" -%}
    case when {{ e }} ~ ('^{{ part }}@{{ part }}\.{{ part }}$')
        then {{ local }} || '@' || {{ domain }} end
{%- elif kind == 'phone' -%}
    {#- Numbering plans are not SQL: phone numbers are normalised in Python at ingest (store/phones.py) -#}
    {{ exceptions.raise_compiler_error("phone numbers are normalised by dcr_pipelines/lib/identifiers.py:phone at ingest (store/phones.py), not in SQL") }}
{%- else -%}
    {%- set trimmed = "btrim(" ~ column ~ ")" -%}
    {%- set cased = dcr_lower(trimmed) if options.get('case') == 'lower' else (dcr_upper(trimmed) if options.get('case') == 'upper' else trimmed) -%}
    {#- blank once tabs and line breaks are trimmed too is missing, as identifier_problem says (and Python) -#}
    case when btrim({{ column }}, ' ' || chr(9) || chr(10) || chr(13)) <> '' then {{ cased }} end
{%- endif -%}
{%- endmacro %}
