-- Key epochs stream each kept value set in token order beside the party's identities (lib/psi_epoch.diff): the
-- tokens compare byte-wise ("C"), so the primary key serves that order without a sort of every kept value.

alter table {schema}.psi_epoch_values alter column token type text collate "C";
