"""`FrameQueue`: the bounded FIFO between a station's camera thread and its inference thread.

Bounded so a slow model can never make frames pile up in memory (latency stays bounded); every
frame it drops is counted, never silent (see `Station` for the drop policy per source kind).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class FrameQueue:
    """Bounded FIFO between capture and inference with a drop policy and a drop counter."""

    def __init__(self, size: int, drop: str = "oldest") -> None:
        if size < 1 or drop not in ("oldest", "newest"):
            raise ValueError("queue size must be >= 1 and drop 'oldest' or 'newest'")
        self.size, self.drop = size, drop
        self.dropped = 0
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._closed = False

    def put(self, item: Any, block: bool = False) -> None:
        """Add `item`; when full, wait (block=True, until space or close) or drop one, counted."""
        with self._cv:
            if block:
                self._cv.wait_for(lambda: len(self._items) < self.size or self._closed)
            if self._closed:
                self.dropped += 1  # captured while shutting down: discarded, still counted
                return
            if len(self._items) >= self.size:
                self.dropped += 1
                if self.drop == "newest":
                    return
                self._items.popleft()
            self._items.append(item)
            self._cv.notify_all()

    def get(self, timeout: float | None = None) -> Any | None:
        with self._cv:
            self._cv.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cv.notify_all()
            return item

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        return len(self._items)
