"""Append-only audit log of threshold changes (JSON lines): who, when, old, new, why.

Each entry is one line, flushed and fsynced before the change is echoed, so an accepted change is
never missing from the log. `entries()` reads it back for `calibrate rollback` and for reports.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.events import iso

log = logging.getLogger(__name__)


class AuditLog:
    """Thread-safe JSON-lines audit log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # the folder is made by the first append, not here

    def check_writable(self) -> AuditLog:
        """Raise LineGuardError now when an append could not create or write the file."""
        from lineguard.runtime.local_checks import writable_file_problem

        problem = writable_file_problem(self.path)
        if problem:
            raise LineGuardError(f"audit log: {problem}")
        return self

    def append(
        self,
        *,
        station: str,
        line: str,
        by: str,
        reason: str,
        old: dict[str, Any] | None,
        new: dict[str, Any] | None,
        action: str = "threshold/set",
        source: str = "mqtt",
        request_id: str | None = None,
        edge_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one entry durably; returns it."""
        entry: dict[str, Any] = {
            "ts": iso(),
            "action": action,
            "edge_id": edge_id,
            "line": line,
            "station": station,
            "by": by,
            "reason": reason,
            "old": old,
            "new": new,
            "source": source,
            "request_id": request_id,
        }
        if extra:
            entry.update(extra)
        data = (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info(
            "audit: %s %s/%s by %s: %s -> %s (%s)", action, line, station, by, old, new, reason
        )
        return entry

    def entries(self, station: str | None = None) -> list[dict[str, Any]]:
        """All entries, oldest first (optionally one station's); a torn last line is skipped."""
        if not self.path.exists():
            return []
        out = []
        with self._lock, open(self.path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError:
                    log.warning("audit log %s:%d: unreadable line skipped", self.path, n)
                    continue
                if station is None or entry.get("station") == station:
                    out.append(entry)
        return out
