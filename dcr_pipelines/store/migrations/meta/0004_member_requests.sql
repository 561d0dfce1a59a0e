-- Members act under their own login: requests are rows, answers are rows only the asking login reads.
--
-- dcr_meta.member_logins maps each member login (a LOGIN role the operator made with `dcr member add`) to its
-- collaboration and member; a login's identity is that row, never an argument. A member submits a request only through
-- dcr_meta.submit_request(collaboration, kind, payload), a SECURITY DEFINER function owned by the NOLOGIN role
-- dcr_request_desk: it takes the member from session_user (which SET ROLE does not change), so no call can ask for
-- another member. The operator's Dagster (a sensor) launches the work and writes the answer into the row; row-level
-- security lets a login read its own rows and nothing else. Every member login is a member of the group
-- dcr_member_logins, which holds no privilege of its own: pg_hba names it to admit member logins over TCP.

do $$
begin
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'dcr_request_desk') then
        begin
            create role dcr_request_desk nologin;
        exception when duplicate_object then null;
        end;
    end if;
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'dcr_member_logins') then
        begin
            create role dcr_member_logins nologin;
        exception when duplicate_object then null;
        end;
    end if;
end
$$;
grant dcr_request_desk to current_user;
grant dcr_member_logins to current_user with admin option;

create table if not exists dcr_meta.member_logins (
    login name primary key,
    collaboration text not null,
    member text not null,
    created_at timestamptz not null default now(),
    rotated_at timestamptz,
    unique (collaboration, member)
);
revoke all on dcr_meta.member_logins from public;
grant select on dcr_meta.member_logins to dcr_request_desk;

create table if not exists dcr_meta.member_requests (
    id bigserial primary key,
    login name not null default session_user,
    collaboration text not null,
    member text not null,
    kind text not null check (kind in ('query_run', 'query_check', 'release', 'budget', 'upload')),
    payload jsonb not null,
    state text not null default 'pending' check (state in ('pending', 'launched', 'answered', 'refused', 'failed')),
    run_id text,
    answer jsonb,
    reason text,
    asked_at timestamptz not null default now(),
    answered_at timestamptz
);
create index if not exists member_requests_waiting on dcr_meta.member_requests (collaboration, state) where state in ('pending', 'launched');
revoke all on dcr_meta.member_requests from public;
grant select, insert on dcr_meta.member_requests to dcr_request_desk;
grant usage on sequence dcr_meta.member_requests_id_seq to dcr_request_desk;
grant usage on schema dcr_meta to dcr_request_desk, dcr_member_logins;
grant select on dcr_meta.member_requests to dcr_member_logins;  -- its own rows only (the policy below)

alter table dcr_meta.member_requests enable row level security;
drop policy if exists login_reads_its_requests on dcr_meta.member_requests;
create policy login_reads_its_requests on dcr_meta.member_requests for select using (login = session_user);
drop policy if exists desk_inserts_for_the_session on dcr_meta.member_requests;
create policy desk_inserts_for_the_session on dcr_meta.member_requests for insert to dcr_request_desk with check (login = session_user);
drop policy if exists desk_reads_for_the_session on dcr_meta.member_requests;
create policy desk_reads_for_the_session on dcr_meta.member_requests for select to dcr_request_desk using (login = session_user);

create or replace function dcr_meta.submit_request(p_collaboration text, p_kind text, p_payload jsonb) returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    who text;
    waiting int;
    made bigint;
begin
    select l.member into who from dcr_meta.member_logins l where l.login = session_user and l.collaboration = p_collaboration;
    if who is null then
        raise exception 'login % is no member login of collaboration %', session_user, p_collaboration
            using errcode = '42501';
    end if;
    if p_kind is null or p_kind not in ('query_run', 'query_check', 'release', 'budget', 'upload') then
        raise exception 'unknown request kind %: one of query_run, query_check, release, budget, upload', p_kind using errcode = '22023';
    end if;
    if p_payload is null or jsonb_typeof(p_payload) <> 'object' or length(p_payload::text) > 100000 then
        raise exception 'a request payload is a JSON object of at most 100000 characters' using errcode = '22023';
    end if;
    -- Flat: every value a string, number, boolean or null, but "params", an object of such values (nothing nested
    -- deeper reaches the operator's side, whose JSON reader has a recursion limit).
    if exists (select 1 from jsonb_each(p_payload) e
                where jsonb_typeof(e.value) in ('object', 'array')
                  and not (e.key = 'params' and jsonb_typeof(e.value) = 'object'
                           and not exists (select 1 from jsonb_each(e.value) p where jsonb_typeof(p.value) in ('object', 'array')))) then
        raise exception 'a request payload is flat: strings, numbers, booleans and nulls (and params, an object of them)' using errcode = '22023';
    end if;
    select count(*) into waiting from dcr_meta.member_requests r
     where r.login = session_user and r.state in ('pending', 'launched');
    if waiting >= 20 then
        raise exception 'login % has 20 requests waiting already: wait for their answers', session_user using errcode = '53400';
    end if;
    insert into dcr_meta.member_requests (login, collaboration, member, kind, payload)
        values (session_user, p_collaboration, who, p_kind, p_payload) returning id into made;
    perform pg_notify('dcr_member_requests', p_collaboration);
    return made;
end
$$;
alter function dcr_meta.submit_request(text, text, jsonb) owner to dcr_request_desk;
revoke all on function dcr_meta.submit_request(text, text, jsonb) from public;
grant execute on function dcr_meta.submit_request(text, text, jsonb) to dcr_member_logins;

-- An upload is streamed first, in chunks under a token the client draws, then asked for with a request naming the
-- token: the operator's side assembles the chunks of that token written by that same login into a file of the
-- dataset's upload queue. A login writes chunks only through this function (it reads none, and no one else's).
create table if not exists dcr_meta.member_upload_chunks (
    token uuid not null,
    login name not null,
    seq int not null,
    data bytea not null,
    size int not null,
    written_at timestamptz not null default now(),
    primary key (token, seq)
);
create index if not exists member_upload_chunks_login on dcr_meta.member_upload_chunks (login);
revoke all on dcr_meta.member_upload_chunks from public;
grant select, insert on dcr_meta.member_upload_chunks to dcr_request_desk;

create or replace function dcr_meta.upload_chunk(p_token uuid, p_seq int, p_data bytea) returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if not exists (select 1 from dcr_meta.member_logins l where l.login = session_user) then
        raise exception 'login % is no member login', session_user using errcode = '42501';
    end if;
    if p_data is null or octet_length(p_data) > 8388608 or p_seq is null or p_seq < 0 or p_seq >= 100000 then
        raise exception 'an upload chunk is at most 8 MiB, numbered 0 to 99999' using errcode = '22023';
    end if;
    -- At most 2 GiB of chunks per login not yet taken by a request (a member cannot fill the server's disk).
    if (select coalesce(sum(c.size), 0) from dcr_meta.member_upload_chunks c where c.login = session_user) + octet_length(p_data) > 2147483648 then
        raise exception 'login % has 2 GiB of upload chunks waiting: ask for the upload they make (or wait a day for them to expire)', session_user
            using errcode = '53400';
    end if;
    insert into dcr_meta.member_upload_chunks (token, login, seq, data, size) values (p_token, session_user, p_seq, p_data, octet_length(p_data));
end
$$;
alter function dcr_meta.upload_chunk(uuid, int, bytea) owner to dcr_request_desk;
revoke all on function dcr_meta.upload_chunk(uuid, int, bytea) from public;
grant execute on function dcr_meta.upload_chunk(uuid, int, bytea) to dcr_member_logins;

-- Large objects outlive a session and are counted nowhere: no role but the superuser creates them in this database
-- (an operator without the right to change that is told, and the rest of the migration stands).
do $$
begin
    revoke execute on function pg_catalog.lo_create(oid), pg_catalog.lo_creat(integer), pg_catalog.lo_from_bytea(oid, bytea) from public;
exception when insufficient_privilege then
    raise notice 'large objects stay creatable by every role of this database (only their owner may revoke it)';
end
$$;
