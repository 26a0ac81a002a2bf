"""One exception type for errors a user can fix (bad file, bad input): no traceback shown."""

from __future__ import annotations


class LineGuardError(Exception):
    """An error with a message meant for the user; `exit_code` is what the CLI returns."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
