"""Durable store-and-forward for MQTT messages (SQLite, WAL): nothing lost while the broker is down.

Every event is committed here BEFORE anyone tries to publish it, and the row is deleted only when
the broker acknowledges it (PUBACK for QoS 1). After a reconnect or a process restart the rows are
published again in insertion order, so delivery is at-least-once; consumers de-duplicate on the
payload's `event_id`.

Durability: `journal_mode=WAL` with `synchronous=FULL`. With WAL, NORMAL already survives a
process crash (SIGKILL), but a power cut can roll back the last commits, and power cuts are
normal on a factory floor. FULL fsyncs the WAL on every commit; `lineguard run` commits from
one writer thread in groups (`event_writer.py`: every event decided within `group_commit_ms` in
one transaction, one fsync), so neither the frame loops nor the event rate pay per fsync.

Bounds: `max_events` (oldest dropped first) and `max_age_h`; every drop is logged as a WARNING
with the count, so an outage longer than the budget is visible, never silent.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    retain   INTEGER NOT NULL DEFAULT 0,
    event_id TEXT,
    created  REAL    NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox(created);
"""


@dataclass(frozen=True)
class Message:
    """One stored message; `id` orders replay."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    event_id: str | None
    created: float
    attempts: int


@dataclass(frozen=True)
class Pending:
    """What a caller hands to `put_many`: a message not yet stored."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    event_id: str | None = None


class Outbox:
    """Thread-safe SQLite outbox. One connection guarded by a lock; every call is short."""

    def __init__(self, path: str | Path, max_events: int = 100_000, max_age_h: float = 168.0):
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_h * 3600.0
        self.dropped = 0  # messages dropped by the bounds since open
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LineGuardError(f"outbox {self.path}: SQLite refused WAL mode ({mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LineGuardError(f"outbox {self.path}: cannot open: {exc}") from None
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if self._count:
            log.info(
                "outbox %s: %d message(s) from a previous run to deliver", self.path, self._count
            )

    # -------------------------------------------------------------- writing

    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        event_id: str | None = None,
    ) -> int:
        """Store one message durably; returns its id."""
        return self.put_many([Pending(topic, payload, qos, retain, event_id)])[0]

    def put_many(self, messages: list[Pending]) -> list[int]:
        """Store several messages in ONE transaction (an event and its evidence arrive together)."""
        now = time.time()
        ids: list[int] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for m in messages:
                    cur = self._db.execute(
                        "INSERT INTO outbox(topic, payload, qos, retain, event_id, created)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (m.topic, sqlite3.Binary(m.payload), m.qos, int(m.retain), m.event_id, now),
                    )
                    ids.append(int(cur.lastrowid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += len(messages)
            if self._count > self.max_events:
                self._drop_oldest_locked(self._count - self.max_events)
        return ids

    def _drop_oldest_locked(self, n: int) -> None:
        rows = self._db.execute("SELECT id, topic FROM outbox ORDER BY id LIMIT ?", (n,)).fetchall()
        if not rows:
            return
        self._db.execute("DELETE FROM outbox WHERE id <= ?", (rows[-1][0],))
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self.dropped += len(rows)
        log.warning(
            "outbox %s is full (max_events=%d): dropped the %d oldest undelivered message(s), "
            "first topic %s; %d dropped since start",
            self.path,
            self.max_events,
            len(rows),
            rows[0][1],
            self.dropped,
        )

    def prune_expired(self, now: float | None = None) -> int:
        """Drop messages older than `max_age_h` (logged); returns how many."""
        cutoff = (time.time() if now is None else now) - self.max_age_s
        with self._lock:
            n = self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,)).rowcount
            if n:
                self._count -= n
                self.dropped += n
                log.warning(
                    "outbox %s: dropped %d undelivered message(s) older than %.1f h",
                    self.path,
                    n,
                    self.max_age_s / 3600.0,
                )
        return n

    # -------------------------------------------------------------- delivery

    def pending(self, after_id: int = 0, limit: int = 100) -> list[Message]:
        """Stored messages with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, event_id, created, attempts FROM outbox"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6], r[7]) for r in rows]

    def mark_attempt(self, ids: list[int]) -> None:
        """Count a publish attempt (diagnostics: a row with many attempts is stuck)."""
        if not ids:
            return
        with self._lock:
            self._db.executemany(
                "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in ids]
            )

    def ack(self, message_ids: list[int]) -> None:
        """The broker acknowledged them: forget them (one transaction, one fsync)."""
        if not message_ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for i in message_ids:
                    n += self._db.execute("DELETE FROM outbox WHERE id = ?", (i,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= n

    def depth(self) -> int:
        """Messages waiting for an acknowledgement."""
        with self._lock:
            return self._count

    def oldest_age_s(self, now: float | None = None) -> float:
        """Seconds the oldest undelivered message has waited (0 when empty); indexed, cheap."""
        with self._lock:
            row = self._db.execute("SELECT MIN(created) FROM outbox").fetchone()
        if row is None or row[0] is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - float(row[0]))

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
