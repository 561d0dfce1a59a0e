-- The operator's bookkeeping, shared by all collaborations (schema dcr_meta).
-- Baseline: idempotent, so deployments made before migrations existed adopt it as is.

create table if not exists dcr_meta.dataset_versions (
    collaboration text not null,
    party text not null,
    dataset text not null,
    version integer not null,
    checksum text not null,
    row_count bigint not null,
    file_name text not null,
    loaded_at timestamptz not null default now(),
    is_current boolean not null default false,
    primary key (collaboration, party, dataset, version)
);

-- Digest of the last successful build of each dbt stage (what lets an unchanged stage skip dbt).
create table if not exists dcr_meta.stage_builds (
    collaboration text not null,
    stage text not null,
    digest text not null,
    built_at timestamptz not null default now(),
    primary key (collaboration, stage)
);

-- The parameters and request key each query's pre-noise table is being built for (read by macro dcr_param).
create table if not exists dcr_meta.query_requests (
    collaboration text not null,
    query_name text not null,
    params jsonb not null,
    request_key text not null,
    written_at timestamptz not null default now(),
    primary key (collaboration, query_name)
);

-- People sets of released groups, for difference checks (sorted SHA-256 unit ids).
create table if not exists dcr_meta.released_people (
    collaboration text not null,
    source text not null,
    source_id text not null,
    row_no integer not null,
    released_at timestamptz not null default now(),
    size integer not null,
    sample bytea not null,
    people bytea not null,
    primary key (collaboration, source, source_id, row_no)
);
create index if not exists released_people_size on dcr_meta.released_people (collaboration, size);
