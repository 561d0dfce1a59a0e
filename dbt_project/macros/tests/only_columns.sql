{#- Fails with one row per column of the relation that is not in `allowed`:
    a secure table must never carry a column the policy does not share. -#}
{% test dcr_only_columns(model, allowed) %}
    select column_name
    from information_schema.columns
    where table_schema = '{{ model.schema }}'
      and table_name = '{{ model.identifier }}'
      and column_name not in ({% for c in allowed %}'{{ c }}'{% if not loop.last %}, {% endif %}{% endfor %})
{% endtest %}
