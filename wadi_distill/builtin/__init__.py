"""Built-in teachers shipped with the project (no downloads)."""
