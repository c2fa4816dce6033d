"""mcbroker: the broker service (one process per host)."""
