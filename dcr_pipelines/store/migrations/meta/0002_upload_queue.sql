-- Landing as a queue: every upload gets an identity (arrival sequence + SHA-256) the moment it is claimed,
-- and moves queued -> processing -> accepted | duplicate | stale | superseded | quarantined (| withdrawn, append mode).

create sequence if not exists dcr_meta.upload_seq;

create table if not exists dcr_meta.uploads (
    seq bigint primary key,
    collaboration text not null,
    party text not null,
    dataset text not null,
    file_name text not null,
    checksum text,
    size_bytes bigint,
    state text not null default 'queued'
        check (state in ('queued', 'processing', 'accepted', 'duplicate', 'stale', 'superseded', 'quarantined', 'withdrawn')),
    reason text,
    attempts integer not null default 0,
    version integer,
    row_count bigint,
    duplicate_rows bigint,
    dropped_rows bigint,
    landed_at timestamptz not null default now(),
    decided_at timestamptz
);
create index if not exists uploads_by_dataset on dcr_meta.uploads (collaboration, party, dataset, state, seq);

-- A version is a list of upload tables (one in replace mode, every accepted file in append mode), the newest
-- upload it includes, and the contract it was checked against.
alter table dcr_meta.dataset_versions add column if not exists parts text[];
alter table dcr_meta.dataset_versions add column if not exists upload_seq bigint;
alter table dcr_meta.dataset_versions add column if not exists contract_sha256 text;
