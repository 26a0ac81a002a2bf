"""The event path off the inference threads: one writer thread per process builds each event
(evidence JPEG, payload, schema check) and commits them to the outbox in GROUPS.

Why: the evidence encode (a few ms) and the outbox commit (SQLite `synchronous=FULL`, one fsync,
from ~1 ms on an SSD to tens of ms on an SD card) used to run on the station's frame thread,
so every defective frame stalled inspection. Now a station hands over `(frame, decision)` and
goes on with the next frame.

Group commit: a group holds every event handed over before its deadline, `max_delay_s` after the
first of the group was handed over, or after the previous commit ended when the first had to
wait for it (the writer is behind); all of them are built and committed in ONE transaction (one
fsync), at most `max_batch` per group. So at most one fsync per `max_delay_s` whatever the event
rate, and a group never grows with the backlog: events handed over after its deadline go to the
next group. (It used to drain the queue until `max_batch`: a saturated writer then held 256
events in a group, seconds of latency, and every one's frame and map.) `max_delay_s = 0` commits
what was waiting when the previous commit ended, without waiting for more.

Memory: a handed-over job holds its frame and map (~1 MB at 640x480) until it is built; the
writer drops them as soon as the JPEG and payload exist, so a group holds only those (bounded by
`evidence.max_bytes` each), and the frames in memory are the queue's (`capacity`).

Durability is what it was: an event is published only after its commit (the publisher reads the
outbox, nothing else). What a crash can lose is an event decided in the last `max_delay_s`,
never one already committed; SIGKILL and broker-outage behaviour of committed events is unchanged.
Back pressure: the hand-over queue is bounded (`capacity`, 32 events: each holds its frame and
map for the evidence, ~1 MB at 640x480, so 1024 let a 4-station line at 100 events/s grow to
1.8 GB and 14 s of latency); when the writer falls behind, the station's frame thread waits (its
camera queue then drops frames, counted) rather than losing decided events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Built = tuple[str, dict[str, Any], bytes | None]  # station id, payload, evidence JPEG for MQTT
CommitFn = Callable[[list[Built]], None]
DoneFn = Callable[[bool], None]


@dataclass(slots=True)
class EventJob:
    """One decided event: `build` runs on the writer thread (once; then dropped with the frame
    and map it holds), `done(ok)` after the commit."""

    station_id: str
    build: Callable[[], tuple[dict[str, Any], bytes | None]] | None
    done: DoneFn | None = None
    queued_at: float = field(default_factory=time.monotonic)


class EventWriter:
    """Single writer thread with group commit (module docstring)."""

    def __init__(
        self,
        commit: CommitFn,
        max_delay_s: float = 0.05,
        max_batch: int = 256,
        capacity: int = 32,
    ) -> None:
        if max_delay_s < 0 or max_batch < 1 or capacity < 1:
            raise ValueError("need max_delay_s >= 0, max_batch >= 1, capacity >= 1")
        self.commit_fn = commit
        self.max_delay_s, self.max_batch, self.capacity = max_delay_s, max_batch, capacity
        self.commits = 0  # transactions (fsyncs) made
        self.committed = 0  # events in them
        self.failed = 0  # events lost to a build or commit error (logged)
        self.waits = 0  # hand-overs that had to wait for room (the disk is too slow)
        self._jobs: deque[EventJob] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)

    # ------------------------------------------------------------ any thread
    def start(self) -> EventWriter:
        self._thread.start()
        return self

    def submit(self, job: EventJob) -> None:
        """Hand an event over; waits only while `capacity` events are already waiting."""
        with self._cv:
            if len(self._jobs) >= self.capacity:
                self.waits += 1
                self._cv.wait_for(lambda: len(self._jobs) < self.capacity or self._closed)
            if self._closed:
                raise RuntimeError("event writer is stopped")
            self._jobs.append(job)
            self._cv.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Build and commit everything handed over so far, then end the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("event writer: %d event(s) not committed at stop", len(self._jobs))

    @property
    def pending(self) -> int:
        """Events handed over and not yet committed (for stats and metrics)."""
        return len(self._jobs)

    # ------------------------------------------------------------ writer thread
    def _next(self, deadline: float | None) -> EventJob | None:
        """The next job handed over before `deadline`, waiting for one until then (`None`: any
        job, waiting as long as it takes); None when there is none (or stopped and drained)."""
        with self._cv:
            if deadline is None:
                self._cv.wait_for(lambda: self._jobs or self._closed)
            elif not self._jobs and (left := deadline - time.monotonic()) > 0:
                self._cv.wait_for(lambda: self._jobs or self._closed, left)
            if not self._jobs or (deadline is not None and self._jobs[0].queued_at > deadline):
                return None
            job = self._jobs.popleft()
            self._cv.notify_all()  # room for a waiting submitter
            return job

    def _run(self) -> None:
        last_commit = float("-inf")
        while True:
            job = self._next(None)
            if job is None:
                return  # closed and drained
            # Behind (the first waited for the last commit): the group starts when that ended.
            deadline = max(job.queued_at, last_commit) + self.max_delay_s
            group: list[tuple[DoneFn | None, Built]] = []
            while job is not None:
                self._build(job, group)
                if len(group) >= self.max_batch:
                    break
                job = self._next(deadline)
            self._commit(group)
            last_commit = time.monotonic()

    def _build(self, job: EventJob, group: list[tuple[DoneFn | None, Built]]) -> None:
        build, job.build = job.build, None  # frees the frame and map once the JPEG exists
        try:
            if build is None:
                raise RuntimeError("event job built twice")
            payload, jpeg = build()
        except Exception:
            self.failed += 1
            log.exception("station %s: event not built", job.station_id)
            _done(job.station_id, job.done, False)
            return
        group.append((job.done, (job.station_id, payload, jpeg)))

    def _commit(self, group: list[tuple[DoneFn | None, Built]]) -> None:
        if not group:
            return
        try:
            self.commit_fn([built for _, built in group])
        except Exception:
            self.failed += len(group)
            log.exception("event writer: commit of %d event(s) failed", len(group))
            for done, built in group:
                _done(built[0], done, False)
            return
        self.commits += 1
        self.committed += len(group)
        for done, built in group:
            _done(built[0], done, True)


def _done(station_id: str, done: DoneFn | None, ok: bool) -> None:
    if done is None:
        return
    try:
        done(ok)
    except Exception:
        log.exception("station %s: event callback failed", station_id)
