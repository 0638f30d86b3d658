"""Prefect tasks: thin, cached wrappers around the domain functions in `abliterate`."""
