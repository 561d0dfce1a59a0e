-- Keyed tokens without key material in reach of a model.
--
-- dbt builds a collaboration as its own login (dcr_<collab>_dbt_login: not a superuser, owns only that collaboration's
-- models). Its models compute HMAC tokens by calling dcr_keys.keyed_token(party, value), which runs as the NOLOGIN
-- role dcr_keyholder and reads the party's padded key from dcr_keys.hmac_pads; the builder may call the function but
-- may not read the table, the schema's other objects or the function's owner. A row exists only while a staging
-- build runs (written before it, deleted after it) and is keyed by the builder login that may use it, so one
-- collaboration's models cannot key with another's pads.

do $$
begin
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'dcr_keyholder') then
        begin
            create role dcr_keyholder nologin;
        exception when duplicate_object then null;  -- another database of the same cluster created it first
        end;
    end if;
end
$$;
grant dcr_keyholder to current_user;

create schema if not exists dcr_keys authorization dcr_keyholder;
revoke all on schema dcr_keys from public;

create table if not exists dcr_keys.hmac_pads (
    login name not null,
    party text not null,
    inner_pad bytea not null,
    outer_pad bytea not null,
    written_at timestamptz not null default now(),
    primary key (login, party)
);
alter table dcr_keys.hmac_pads owner to dcr_keyholder;
revoke all on dcr_keys.hmac_pads from public;

-- HMAC-SHA256(K, m) = H((K' xor opad) || H((K' xor ipad) || m)) from core sha256() (no pgcrypto on the embedded server).
create or replace function dcr_keys.keyed_token(party text, value text) returns text
language plpgsql stable parallel safe security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    i_pad bytea;
    o_pad bytea;
begin
    if value is null then
        return null;
    end if;
    select p.inner_pad, p.outer_pad into i_pad, o_pad
      from dcr_keys.hmac_pads p where p.login = session_user and p.party = keyed_token.party;
    if i_pad is null then
        raise exception 'no HMAC key of party % is open to login %: keyed tokens are computed only inside a staging build', keyed_token.party, session_user;
    end if;
    return encode(sha256(o_pad || sha256(i_pad || convert_to(value, 'UTF8'))), 'hex');
end
$$;
alter function dcr_keys.keyed_token(text, text) owner to dcr_keyholder;
revoke all on function dcr_keys.keyed_token(text, text) from public;

-- The two operator tables models read (the request a pre-noise table is built for; the upload tables of a dataset's
-- current version): each builder login sees its own collaboration's rows and nothing else (row-level security; the
-- operator's login owns the tables and is not subject to it). Grants to each builder are made with its login.
alter table dcr_meta.query_requests enable row level security;
create policy builder_reads_its_collaboration on dcr_meta.query_requests for select
    using (current_user = 'dcr_' || collaboration || '_dbt_login');
alter table dcr_meta.dataset_versions enable row level security;
create policy builder_reads_its_collaboration on dcr_meta.dataset_versions for select
    using (current_user = 'dcr_' || collaboration || '_dbt_login');
