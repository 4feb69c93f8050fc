"""Schema registry: client, embedded service, compatibility checks."""
