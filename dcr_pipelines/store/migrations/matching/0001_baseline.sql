-- A collaboration's matching schema ({schema}): the history of cross-reference builds and of bucket steps.

create table if not exists {schema}.cross_reference_builds (
    input_digest text not null,
    matched bigint not null,
    built_at timestamptz not null default now()
);

create table if not exists {schema}.bucket_builds (
    bucket int primary key,
    input_digest text not null,
    matched bigint not null,
    bytes_exchanged bigint not null,
    built_at timestamptz not null default now()
);
