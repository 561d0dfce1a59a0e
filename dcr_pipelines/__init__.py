"""An open-source data clean room: policy-as-code, Dagster, dbt, PSI and differential privacy."""
