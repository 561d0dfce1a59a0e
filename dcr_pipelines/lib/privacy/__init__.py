"""The privacy core: noise (mechanisms), budget (ledger) and the release that ties them."""
