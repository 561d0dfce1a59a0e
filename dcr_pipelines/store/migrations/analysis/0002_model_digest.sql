-- The model each pre-noise view was built from (lib/dbt_codegen.model_digest): a release with the same model and other
-- parameters only records its request; one with another model has dbt build the view first.
alter table {schema}.built_from add column if not exists model_sha256 text;
