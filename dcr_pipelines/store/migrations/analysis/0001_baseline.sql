-- A collaboration's analysis schema ({schema}): which request each query's pre-noise table was last built for.

create table if not exists {schema}.built_from (
    query_name text primary key,
    params jsonb not null,
    input_versions jsonb not null,
    built_at timestamptz not null default now()
);
alter table {schema}.built_from add column if not exists request_key text;
