{#- HMAC-SHA256 of a normalised identifier under the party's key, hex encoded.

    Built from core sha256() (no pgcrypto on the embedded server):
    HMAC(K, m) = H((K' xor opad) || H((K' xor ipad) || m)). The two padded
    keys are computed in Python from the secret resource and held in the
    keys relation only while the staging models build; neither the key nor
    the pads ever appear in SQL text. -#}
{% macro dcr_keyed_token(expression, keys_alias) -%}
    {{ return(adapter.dispatch('dcr_keyed_token', 'dcr')(expression, keys_alias)) }}
{%- endmacro %}

{% macro postgres__dcr_keyed_token(expression, keys_alias) -%}
    encode(sha256({{ keys_alias }}.outer_pad || sha256({{ keys_alias }}.inner_pad || convert_to({{ expression }}, 'UTF8'))), 'hex')
{%- endmacro %}
