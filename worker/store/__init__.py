"""The database: models, the append-only hash-chained event log, step claims, audit and
migrations. Imports only ``worker.core``."""
