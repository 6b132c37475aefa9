"""The process boundary: enclave host, bridge client, ledger, sealing, launcher."""
