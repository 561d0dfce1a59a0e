-- Key epochs (matching.key_epoch): each party's PSI key of the current epoch, and the doubly blinded value of each
-- party's tokens for its matching peer. Operator-only, like the rest of {schema}; deleted (keys too) when the epoch ends.

create table if not exists {schema}.psi_epoch (
    party text primary key,
    psi_key bytea not null,
    config text not null,
    started_at timestamptz not null default now()
);

create table if not exists {schema}.psi_epoch_values (
    owner text not null,
    peer text not null,
    token text not null,
    value bytea not null,
    primary key (owner, peer, token)
);
