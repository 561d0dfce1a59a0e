{#- Keep at most max_rows_per_group rows per (unit, group) and at most
    max_groups_per_unit groups per unit, choosing deterministically by a hash
    so a re-run over the same inputs keeps the same rows. This is what makes
    the sensitivity handed to opendp true by construction.

    A group is its tuple of typed values, never a string made from them: the
    ranking hashes the record's text form (which quotes separators and tells
    NULL from '') and then breaks ties on the values themselves, so two
    different groups can never share a rank, whatever their values. -#}
{% macro dcr_bound_contributions(relation, unit, group_columns, max_rows_per_group, max_groups_per_unit) -%}
    {%- set groups = group_columns | join(", ") -%}
    with ranked_rows as (
        select
            *,
            row_number() over (
                partition by {{ unit }}{% if group_columns %}, {{ groups }}{% endif %}
                order by md5(cast(row_to_json(r) as text))
            ) as dcr_row_rank
        from {{ relation }} as r
    ),
    kept_rows as (
        select * from ranked_rows where dcr_row_rank <= {{ max_rows_per_group }}
    ),
    ranked_groups as (
        select
            *,
            {%- if group_columns %}
            dense_rank() over (
                partition by {{ unit }}
                order by md5(cast({{ unit }} as text) || cast(row({{ groups }}) as text)), {{ groups }}
            ) as dcr_group_rank
            {%- else %}
            1 as dcr_group_rank
            {%- endif %}
        from kept_rows
    )
    select * from ranked_groups where dcr_group_rank <= {{ max_groups_per_unit }}
{%- endmacro %}
