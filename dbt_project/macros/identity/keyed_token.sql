{#- HMAC-SHA256 of a normalised identifier under the party's key, hex encoded.

    Computed by dcr_keys.keyed_token(party, value), a security-definer function
    (see dcr_pipelines/store/migrations/meta/0003_keyed_tokens.sql): dbt builds
    as the collaboration's builder login, which may call it during a staging
    build but can never read the key. No key material is in SQL text, a session
    setting, the dbt process's environment, a table the model can read or a
    dbt artefact. Outside a staging build the function fails instead of
    producing unkeyed tokens. -#}
{% macro dcr_keyed_token(expression, party) -%}
    {{ return(adapter.dispatch('dcr_keyed_token', 'dcr')(expression, party)) }}
{%- endmacro %}

{% macro postgres__dcr_keyed_token(expression, party) -%}
    dcr_keys.keyed_token('{{ party }}', {{ expression }})
{%- endmacro %}
