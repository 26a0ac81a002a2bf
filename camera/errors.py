"""Camera errors. camera/ imports nothing else of ours (architecture.md), so it has its own types;
the runtime turns `CameraConfigError` into its user-facing error at the station boundary."""

from __future__ import annotations


class CameraConfigError(ValueError):
    """A camera cannot be built from its settings (unknown kind, missing key, extra not installed).

    A user must fix it: the CLI prints it without a traceback.
    """

    exit_code: int = 1


class CameraError(Exception):
    """A source could not be opened or stopped delivering; the reader retries."""
