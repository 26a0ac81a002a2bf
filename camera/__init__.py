"""LineGuard camera stage."""
