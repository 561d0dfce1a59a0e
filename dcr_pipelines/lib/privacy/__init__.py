"""The privacy core, pure: noise (mechanisms) and difference checks. The budget ledger is in store/, the release service in services/."""
