"""LineGuard train stage."""
