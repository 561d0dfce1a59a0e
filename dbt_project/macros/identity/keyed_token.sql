{#- HMAC-SHA256 of a normalised identifier under the party's key, hex encoded.

    Built from core sha256() (no pgcrypto on the embedded server):
    HMAC(K, m) = H((K' xor opad) || H((K' xor ipad) || m)). The two padded
    keys are computed in Python from the secret resource and reach this SQL
    only as session settings of the dbt process (libpq PGOPTIONS), so no key
    material is ever in SQL text, a table or a dbt artefact. A missing
    setting fails the model instead of producing unkeyed tokens. -#}
{% macro dcr_keyed_token(expression, party) -%}
    {{ return(adapter.dispatch('dcr_keyed_token', 'dcr')(expression, party)) }}
{%- endmacro %}

{% macro postgres__dcr_keyed_token(expression, party) -%}
    encode(sha256(
        decode(current_setting('dcr.hmac_{{ party }}_outer'), 'hex')
        || sha256(decode(current_setting('dcr.hmac_{{ party }}_inner'), 'hex') || convert_to({{ expression }}, 'UTF8'))
    ), 'hex')
{%- endmacro %}
