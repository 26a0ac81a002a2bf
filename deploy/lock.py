"""One deploy at a time per root: an advisory `fcntl.flock` on `<root>/deploy.lock`.

flock is released by the kernel when the holder dies, so a crashed install never leaves a stale
lock behind; the file's content (pid, command, time) only serves the waiting side's message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)

LOCK_FILE = "deploy.lock"
EX_TEMPFAIL = 75


class DeployLock:
    """Context manager. `timeout=None` waits forever, `0` fails at once if the lock is held."""

    def __init__(self, root: Path, timeout: float | None = None, poll: float = 0.2) -> None:
        self.path = Path(root) / LOCK_FILE
        self.timeout = timeout
        self.poll = poll
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        return f"pid {info.get('pid')} ({info.get('command', '?')}, since {info.get('since', '?')})"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if self.timeout is not None and waited >= self.timeout:
                    holder = self._holder()
                    os.close(fd)
                    raise LineGuardError(
                        f"{self.path}: another deploy is running ({holder}); gave up after "
                        f"{waited:.0f}s (raise --lock-timeout to wait longer)",
                        exit_code=EX_TEMPFAIL,
                    ) from None
                if not told:
                    log.warning("waiting for the deploy lock held by %s", self._holder())
                    told = True
                time.sleep(self.poll)
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "command": " ".join(
                os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)
            )[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DeployLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
