"""`Camera`: reads a FrameSource in a background thread, paces files, reconnects, reports loss.

Why a wrapper around every source: the things that go wrong on a line (a cable pulled, an RTSP
server rebooting, a share unmounted) look different per source but need the same handling. The
reader turns them into one state machine:

- open fails or a read raises → close, wait (exponential backoff from `reconnect_initial_s`,
  doubling to `reconnect_max_s`, reset by the next good frame), reopen; forever, until `stop()`.
- **lost**: an open attempt failed, or no frame was read for `lost_after_s` while the reader was
  waiting on the source (time spent pacing or handing a frame over does not count). A watchdog
  thread checks the second condition, so a read that blocks inside a driver is still noticed.
  `on_lost(reason)` fires once per episode; `on_recovered()` fires with the next good frame.
- end of a finite source (video/folder without `loop`) → `on_end()`, thread exits; not "lost".

Frames go to `on_frame(frame)` (called in the reader thread; it may block, e.g. for back
pressure) or, without it, to a one-slot "latest frame" buffer read with `get()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lineguard.camera.frame import Frame
from lineguard.camera.sources import CameraError, FrameSource

log = logging.getLogger(__name__)

_WATCHDOG_PERIOD_S = 0.1


class Camera:
    """A FrameSource plus a reader thread, pacing, reconnect with backoff and a `lost` state."""

    def __init__(
        self,
        source: FrameSource,
        *,
        fps: float | None = None,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        lost_after_s: float = 3.0,
        on_frame: Callable[[Frame], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        if reconnect_initial_s <= 0 or reconnect_max_s < reconnect_initial_s:
            raise ValueError("need 0 < reconnect_initial_s <= reconnect_max_s")
        self.source = source
        self.name = source.name
        # Live sources deliver at their own rate; only files are paced by us.
        self.period = 1.0 / fps if (fps and source.is_file) else 0.0
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.lost_after_s = lost_after_s
        self.on_frame, self.on_lost, self.on_recovered, self.on_end = (
            on_frame,
            on_lost,
            on_recovered,
            on_end,
        )
        self._stop = threading.Event()
        self._state_lock = threading.RLock()
        self._lost = False
        self._ended = False
        self._waiting_since: float | None = None  # set while blocked on the source
        self._last_error = ""
        self._next_id = 0
        self.frames_read = 0
        self.reconnects = 0
        self.lost_episodes = 0
        self._latest: Frame | None = None
        self._latest_cv = threading.Condition()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- public API
    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def last_error(self) -> str:
        return self._last_error

    def start(self) -> Camera:
        if self._threads:
            raise RuntimeError(f"camera {self.name} already started")
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True),
            threading.Thread(target=self._watchdog, name=f"camwatch-{self.name}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads and release the source (a read stuck in a driver may take longer)."""
        self._stop.set()
        with self._latest_cv:
            self._latest_cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self._threads = []

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not returned before (only when no `on_frame` was given)."""
        with self._latest_cv:
            if self._latest is None:
                self._latest_cv.wait_for(
                    lambda: self._latest is not None or self._stop.is_set() or self._ended,
                    timeout,
                )
            frame, self._latest = self._latest, None
            return frame

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals
    def _set_lost(self, reason: str) -> None:
        with self._state_lock:
            if self._lost or self._stop.is_set():
                return
            self._lost = True
            self.lost_episodes += 1
            log.warning("camera %s lost: %s", self.name, reason)
            if self.on_lost:
                self._safe(self.on_lost, reason)

    def _set_recovered(self) -> None:
        with self._state_lock:
            if not self._lost:
                return
            self._lost = False
            log.warning("camera %s recovered", self.name)
            if self.on_recovered:
                self._safe(self.on_recovered)

    def _safe(self, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("camera %s: callback %s failed", self.name, getattr(fn, "__name__", fn))

    def _watchdog(self) -> None:
        while not self._stop.wait(_WATCHDOG_PERIOD_S):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.lost_after_s:
                detail = f"; last error: {self._last_error}" if self._last_error else ""
                self._set_lost(f"no frame for {self.lost_after_s:g} s{detail}")

    def _open(self) -> bool:
        try:
            self.source.open()
            return True
        except CameraError as exc:
            self._last_error = str(exc)
        except Exception as exc:  # a driver bug must not kill the reader thread
            self._last_error = f"{type(exc).__name__}: {exc}"
        self._set_lost(f"open failed: {self._last_error}")
        return False

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2.0, self.reconnect_max_s)

    def _run(self) -> None:
        delay = self.reconnect_initial_s
        opened = False
        next_due = time.monotonic()
        self._waiting_since = time.monotonic()
        try:
            while not self._stop.is_set():
                if not opened:
                    opened = self._open()
                    if not opened:
                        delay = self._backoff(delay)
                        continue
                try:
                    image = self.source.read()
                except Exception as exc:
                    self._last_error = str(exc)
                    log.warning("camera %s: %s; reconnecting", self.name, exc)
                    self.source.close()
                    opened = False
                    self.reconnects += 1
                    delay = self._backoff(delay)
                    continue
                if image is None:
                    self._ended = True
                    self._waiting_since = None
                    log.info("camera %s: end of %s", self.name, self.source.describe())
                    if self.on_end:
                        self._safe(self.on_end)
                    return
                frame = Frame(self._next_id, time.time(), time.monotonic(), image, self.name)
                self._waiting_since = None
                self._next_id += 1
                self.frames_read += 1
                self._last_error = ""
                delay = self.reconnect_initial_s
                self._set_recovered()
                self._deliver(frame)
                if self.period:
                    next_due = max(next_due + self.period, time.monotonic() - self.period)
                    self._stop.wait(max(0.0, next_due - time.monotonic()))
                self._waiting_since = time.monotonic()
        finally:
            self._waiting_since = None
            self.source.close()
            with self._latest_cv:
                self._latest_cv.notify_all()

    def _deliver(self, frame: Frame) -> None:
        if self.on_frame is not None:
            self._safe(self.on_frame, frame)
            return
        with self._latest_cv:
            self._latest = frame
            self._latest_cv.notify_all()
