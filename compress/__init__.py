"""LineGuard compress stage."""
