"""Drains the outbox to the broker on its own thread, deleting each row on the broker's PUBACK.

The frame loop only commits to SQLite and calls `wake()`; this thread does the network side.
Rows are handed to paho in id order while connected, at most `window` unacknowledged at a time
(default: paho's in-flight limit, `MqttLink.max_inflight`, so handed rows go on the wire
rather than pile up in paho's queue). Once the window is full the thread waits for PUBACKs (paho's
`on_publish` wakes it) and reads more rows only when at most `refill_at` are left unacknowledged,
so each read and attempt update covers half a window. The backlog of a slow or paused broker
therefore stays in the outbox on disk; memory holds at most `window` messages (each bounded by
`evidence.max_bytes`), and paho's own `max_queued_messages` caps what it would take anyway.

paho keeps handed QoS 1 messages until PUBACK and re-sends them after a reconnect, so a row is
handed once per process; after a restart every stored row is handed again (at-least-once,
consumers de-duplicate on event_id).
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as paho

from lineguard.runtime.mqtt import MqttLink
from lineguard.runtime.outbox import Outbox

log = logging.getLogger(__name__)


class OutboxPublisher:
    """Thread that moves outbox rows to MQTT and acknowledges them."""

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        window: int | None = None,
        prune_every_s: float = 60.0,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = link.max_inflight if window is None else window
        if self.window < 1:
            raise ValueError("the publisher's window must be >= 1")
        self.refill_at = self.window // 2  # read more rows once at most this many are unacked
        self.prune_every_s = prune_every_s
        self.published = 0  # rows acknowledged by the broker since start
        self.peak_in_flight = 0  # most rows handed and unacknowledged at once (<= window)
        self._wake = threading.Event()
        self._stop = threading.Event()
        # row id -> paho MQTTMessageInfo, handed and not yet acknowledged. Polling
        # `is_published()` (set by paho after PUBACK) avoids racing paho's callback thread.
        self._inflight: dict[int, paho.MQTTMessageInfo] = {}
        self._last_handed = 0
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        link.on_published = self._on_published

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something new to send (or the link came up)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.flush_acks()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _on_published(self, mid: int) -> None:
        self._wake.set()  # runs on paho's thread: only wake ours

    # -------------------------------------------------------------- own thread

    def _run(self) -> None:
        last_prune = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.05 if self._inflight else 1.0)
            self._wake.clear()
            try:
                self.flush_acks()
                if time.monotonic() - last_prune > self.prune_every_s:
                    self.outbox.prune_expired()
                    last_prune = time.monotonic()
                if self.link.connected:
                    self._hand_over()
            except Exception:
                log.exception("outbox publisher: unexpected error; retrying in 1 s")
                time.sleep(1.0)

    def flush_acks(self) -> None:
        """Delete the rows the broker has acknowledged (PUBACK) since the last call."""
        done = [row for row, info in self._inflight.items() if info.is_published()]
        if done:
            self.outbox.ack(done)
            for row in done:
                del self._inflight[row]
            self.published += len(done)

    def _hand_over(self) -> None:
        if len(self._inflight) > self.refill_at:
            return  # the PUBACKs of the rows on the wire wake this thread
        batch = self.outbox.pending(after_id=self._last_handed, limit=self.window - self.in_flight)
        handed: list[int] = []
        for msg in batch:
            if not self.link.connected or self._stop.is_set():
                break
            info = self.link.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            if info is None:
                break  # paho's queue is full (or refused): the row waits in the outbox
            handed.append(msg.id)
            self._last_handed = msg.id
            self._inflight[msg.id] = info
        self.peak_in_flight = max(self.peak_in_flight, len(self._inflight))
        self.outbox.mark_attempt(handed)
