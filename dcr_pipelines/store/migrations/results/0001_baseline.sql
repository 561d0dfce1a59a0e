-- A collaboration's results schema ({schema}): the budget ledger, stored releases and the audit chain.

create table if not exists {schema}.budget_ledger (
    entry_id bigserial primary key,
    consumer text not null,
    query_name text not null,
    release_id text not null,
    epsilon double precision not null check (epsilon >= 0),
    delta double precision not null default 0 check (delta >= 0),
    charged_at timestamptz not null default now()
);

create table if not exists {schema}.releases (
    release_id text primary key,
    cache_key text not null unique,
    query_name text not null,
    consumer text not null,
    params jsonb not null,
    input_versions jsonb not null,
    epsilon double precision not null,
    rows jsonb not null,
    released_at timestamptz not null default now()
);
alter table {schema}.releases add column if not exists seq bigserial;
alter table {schema}.releases add column if not exists delta double precision not null default 0;
alter table {schema}.releases add column if not exists receivers jsonb not null default '[]';
alter table {schema}.releases add column if not exists query_sha256 text not null default '';
alter table {schema}.releases add column if not exists rows_sha256 text;
alter table {schema}.releases add column if not exists entry_sha256 text;
alter table {schema}.releases add column if not exists prev_sha256 text;
alter table {schema}.releases add column if not exists chain_sha256 text;

create table if not exists {schema}.audit_chain (
    seq bigserial primary key,
    kind text not null,
    ref text not null,
    entry jsonb not null,
    entry_sha256 text not null,
    prev_sha256 text not null,
    chain_sha256 text not null,
    recorded_at timestamptz not null default now()
);

-- The noised overlap (overlap_release: dp or exact).
create table if not exists {schema}.overlap (
    release_id text not null,
    metric text not null,
    value double precision,
    ci_low double precision,
    ci_high double precision
);
