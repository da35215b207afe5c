"""The hosting domain: models' rules, the store (the only writer of messages, counters and leases)."""
