"""LineGuard runtime stage."""
