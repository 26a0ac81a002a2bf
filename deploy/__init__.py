"""LineGuard deploy stage."""
