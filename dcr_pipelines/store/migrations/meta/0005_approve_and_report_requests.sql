-- Two more kinds of member request: "approve" (a member approves the policy's current hashes under its own login; the
-- answer is recorded in the collaboration's audit chain) and "report" (the member's own report, written by its client).
alter table dcr_meta.member_requests drop constraint if exists member_requests_kind_check;
alter table dcr_meta.member_requests add constraint member_requests_kind_check
    check (kind in ('query_run', 'query_check', 'release', 'budget', 'upload', 'approve', 'report'));

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
    if p_kind is null or p_kind not in ('query_run', 'query_check', 'release', 'budget', 'upload', 'approve', 'report') then
        raise exception 'unknown request kind %: one of query_run, query_check, release, budget, upload, approve, report', p_kind
            using errcode = '22023';
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
