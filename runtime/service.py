"""`lineguard run`: all stations of a site, wired to the outbox, MQTT, stats and threshold commands.

Stations built here share one compiled model per artifact and precision (`engine_pool.py`)
and hand their events to one writer thread (`event_writer.py`), which renders the evidence,
builds the payload and calls `commit_events`: every event of a group in ONE outbox transaction,
then a wake-up of the publisher thread, nothing else, so no frame loop waits on the disk or the
network. `submit_event` is the same commit for one event, on the caller's thread (stations built
by a custom factory). Without a broker, events still go to the outbox and are printed to stdout
as JSON lines. With `metrics` (site config or `--metrics-port`), `/metrics` serves Prometheus.

Threshold commands (`threshold_handler.py`) arrive on paho's thread, are checked, are
applied to the station from its next frame on, written to the audit log and echoed (retained) on
`threshold/state`; a malformed command gets a reply on `threshold/error` and changes nothing.
Live changes are not written back to the station file: `lineguard calibrate` does that, so a
restart returns to the file's values (and says so on `threshold/state`, `changed_by: null`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from lineguard.runtime import events as ev
from lineguard.runtime.audit import AuditLog
from lineguard.runtime.config import StationConfig
from lineguard.runtime.config_loader import LoadedSite
from lineguard.runtime.engine_pool import EnginePool
from lineguard.runtime.event_commit import EventCommitMixin
from lineguard.runtime.event_writer import EventWriter
from lineguard.runtime.mqtt import MqttLink
from lineguard.runtime.outbox import Outbox
from lineguard.runtime.publisher import OutboxPublisher
from lineguard.runtime.threshold_handler import ThresholdCommandsMixin

log = logging.getLogger(__name__)


class StationLike(Protocol):
    """What the service needs from a station (`lineguard.runtime.station.Station`)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def thresholds(self) -> dict[str, Any]: ...
    def shadow(self) -> dict[str, Any] | None: ...
    def set_thresholds(self, image=None, pixel=None, min_area_px=None) -> Any: ...
    def set_shadow(self, image=None, pixel=None, min_area_px=None) -> Any: ...


OnEvent = Callable[[dict[str, Any], bytes | None], None]
OnStatus = Callable[[str, str], None]
EvidenceTopic = Callable[[str], str]
StationFactory = Callable[[StationConfig, str, OnEvent, OnStatus, EvidenceTopic], StationLike]


@dataclass
class _Slot:
    """Service-side state of one station."""

    config: StationConfig
    station: StationLike | None = None
    state: str = "offline"
    reason: str = "starting"
    # When the slot was made, not 0.0: a status published before the station reports (the
    # broker may connect first) must not say 1970-01-01.
    state_ts: float = field(default_factory=time.time)
    threshold_by: str | None = None
    threshold_reason: str | None = None
    threshold_request: str | None = None
    threshold_ts: float = field(default_factory=time.time)
    payload_errors: int = 0


class Service(EventCommitMixin, ThresholdCommandsMixin):
    """Runs a site: build with a LoadedSite, then `start()` / `stop()` or `run_forever()`."""

    def __init__(
        self,
        loaded: LoadedSite,
        station_factory: StationFactory | None = None,
        stdout: TextIO | None = None,
        strict_schemas: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.site = loaded.site
        self.topics = ev.Topics(self.site.topic_prefix, self.site.edge_id)
        self.station_factory = station_factory or self._default_station
        inf = self.site.inference
        self.engines = EnginePool(
            loaded.stations, inf.cores, inf.streams, inf.threads_per_stream
        )  # loads nothing until the first station asks
        self.writer = EventWriter(
            self.commit_events, max_delay_s=self.site.outbox.group_commit_ms / 1000.0
        )
        self.metrics = None
        m = self.site.metrics
        if metrics_port is not None or m is not None:
            from lineguard.runtime.metrics import RuntimeMetrics  # prometheus_client: only if on

            host = m.host if m is not None else "0.0.0.0"
            port = metrics_port if metrics_port is not None else m.port
            self.metrics = RuntimeMetrics(self, host, port)
        self.stdout = stdout if stdout is not None else sys.stdout
        self.strict_schemas = strict_schemas
        self.slots = {s.station_id: _Slot(s) for s in loaded.stations}
        self._by_set_topic = {
            self.topics.threshold_set(s.line_id, s.station_id): s.station_id
            for s in loaded.stations
        }
        self.outbox: Outbox | None = None
        self.audit = AuditLog(self.site.audit_log)
        self.link: MqttLink | None = None
        self.publisher: OutboxPublisher | None = None
        self._stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._stdout_lock = threading.Lock()
        self._schema_failures = 0

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Build stations (engine load, prompt tokens) and the broker link, then open the
        outbox (the first thing written to disk), connect and start the frame loops."""
        o = self.site.outbox
        for sid, slot in self.slots.items():
            c = slot.config
            slot.station = self.station_factory(
                c,
                self.site.edge_id,
                lambda payload, jpeg, sid=sid: self.submit_event(sid, payload, jpeg),
                lambda state, reason, sid=sid: self.set_status(sid, state, reason),
                lambda eid, c=c: self.topics.evidence(c.line_id, c.station_id, eid),
            )
            slot.threshold_ts = time.time()
        if self.site.broker is not None:
            self.link = MqttLink(
                self.site.broker,
                self.site.client_id(),
                self.topics.available(),
                on_connected=self._on_connected,
                on_message=self._on_message,
            )
            for topic in self._by_set_topic:
                self.link.subscribe(topic)
        self.outbox = Outbox(o.path, o.max_events, o.max_age_h)
        self.writer.start()
        if self.metrics is not None:
            self.metrics.serve()
        if self.link is not None:
            self.publisher = OutboxPublisher(self.outbox, self.link)
            self.publisher.start()
            self.link.start()
        else:
            log.warning("no broker configured: events go to the outbox %s and stdout", o.path)
        for slot in self.slots.values():
            slot.station.start()
        self._stats_thread = threading.Thread(target=self._stats_loop, name="stats", daemon=True)
        self._stats_thread.start()

    def stop(self, drain_s: float = 3.0) -> None:
        """Stop stations, publish what the broker takes within `drain_s`, mark every station
        offline (retained), close. Undelivered events stay in the outbox for the next start."""
        self._stop.set()
        for slot in self.slots.values():
            if slot.station is not None:
                try:
                    slot.station.stop()
                except Exception:
                    log.exception("station %s: stop failed", slot.config.station_id)
            slot.state, slot.reason, slot.state_ts = "offline", "runtime stopped", time.time()
        self.writer.stop()  # commits every event the stations handed over
        self.engines.close()
        if self._stats_thread is not None:
            self._stats_thread.join(5.0)
        if self.publisher is not None:
            # Give the broker a moment to take what is queued; the rest stays in the outbox.
            deadline = time.monotonic() + drain_s
            while self.link.connected and self.outbox.depth() and time.monotonic() < deadline:
                self.publisher.wake()
                time.sleep(0.05)
            self.publisher.stop()
        if self.link is not None:
            final = [
                (t, ev.encode(p), True)
                for t, p in (self._status_message(s) for s in self.slots.values())
            ]
            self.link.stop(final)
        if self.publisher is not None:
            self.publisher.flush_acks()  # PUBACKs that arrived while stopping
            if self.outbox.depth():
                log.info("outbox: %d message(s) kept for the next start", self.outbox.depth())
        if self.metrics is not None:
            self.metrics.close()
        if self.outbox is not None:
            self.outbox.close()

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        stop = threading.Event()

        def handle(signum, frame):
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        return 0

    # -------------------------------------------------------------- from stations (frame threads)

    def submit_event(self, station_id: str, payload: dict[str, Any], jpeg: bytes | None) -> None:
        """Commit one defect event (and its evidence JPEG) to the outbox on the caller's thread;
        no network I/O here. With `strict_schemas`, a payload that breaks its schema raises
        (after the commit: a schema slip never costs the event)."""
        errors = self.commit_events([(station_id, payload, jpeg)])
        if errors and self.strict_schemas:
            raise ValueError("; ".join(errors))

    def set_status(self, station_id: str, state: str, reason: str = "") -> None:
        """Station state changed (online / offline / camera-lost): publish it retained."""
        if state not in ev.STATES:
            raise ValueError(f"unknown station state {state!r}")
        slot = self.slots[station_id]
        if (slot.state, slot.reason) == (state, reason):
            return
        slot.state, slot.reason, slot.state_ts = state, reason, time.time()
        log.info("station %s: %s %s", station_id, state, reason)
        self._publish_now(*self._status_message(slot), retain=True)

    # -------------------------------------------------------------- MQTT side

    def _status_message(self, slot: _Slot) -> tuple[str, dict[str, Any]]:
        c = slot.config
        payload = ev.status_payload(
            self.site.edge_id, c.line_id, c.station_id, slot.state, slot.reason, slot.state_ts
        )
        return self.topics.status(c.line_id, c.station_id), payload

    def _threshold_message(self, slot: _Slot) -> tuple[str, dict[str, Any]]:
        c = slot.config
        payload = ev.threshold_state_payload(
            self.site.edge_id,
            c.line_id,
            c.station_id,
            active=slot.station.thresholds(),
            shadow=slot.station.shadow(),
            changed_by=slot.threshold_by,
            reason=slot.threshold_reason,
            request_id=slot.threshold_request,
            ts=slot.threshold_ts,
        )
        return self.topics.threshold_state(c.line_id, c.station_id), payload

    def _publish_now(self, topic: str, payload: dict[str, Any], retain: bool, qos: int = 1) -> None:
        """State messages skip the outbox: they are re-published on every reconnect anyway."""
        if self.link is not None and self.link.connected:
            try:
                data = ev.encode(payload)
            except (TypeError, ValueError) as exc:  # never put invalid JSON on the wire
                log.error("%s: payload not published: %s", topic, exc)
                return
            self.link.publish(topic, data, qos=qos, retain=retain)

    def _on_connected(self) -> None:
        for slot in self.slots.values():
            self._publish_now(*self._status_message(slot), retain=True)
            if slot.station is not None:
                self._publish_now(*self._threshold_message(slot), retain=True)
        if self.publisher is not None:
            self.publisher.wake()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        station_id = self._by_set_topic.get(topic)
        if station_id is None:
            return
        self.handle_threshold_command(station_id, payload, retained)

    def _default_station(
        self,
        config: StationConfig,
        edge_id: str,
        on_event: OnEvent,
        on_status: OnStatus,
        evidence_topic: EvidenceTopic,
    ) -> StationLike:
        """A real station on the shared engine, its events through the writer thread."""
        from lineguard.runtime.station import Station  # loads the inference engine

        return Station(
            config,
            edge_id=edge_id,
            on_event=on_event,
            on_status=on_status,
            evidence_topic=evidence_topic,
            engine=self.engines.station_engine(config),
            writer=self.writer,
            metrics=None if self.metrics is None else self.metrics.station(config),
        )

    # -------------------------------------------------------------- stats

    def stats_messages(self) -> list[tuple[str, dict[str, Any]]]:
        depth = self.outbox.depth() if self.outbox is not None else 0
        connected = self.link is not None and self.link.connected
        out = []
        for slot in self.slots.values():
            c = slot.config
            try:
                payload = self._stats_payload(slot, depth, connected)
            except Exception:  # one station's bad stats never stop the others'
                log.exception("station %s: stats not built", c.station_id)
                continue
            out.append((self.topics.stats(c.line_id, c.station_id), payload))
        return out

    def _stats_payload(self, slot: _Slot, depth: int, connected: bool) -> dict[str, Any]:
        c = slot.config
        payload = ev.stats_payload(
            self.site.edge_id,
            c.line_id,
            c.station_id,
            self.site.stats_interval_s,
            {**slot.station.stats(), "payload_errors": slot.payload_errors},
            depth,
            connected,
            slot.state,
        )
        ev.encode(payload)  # strict JSON now, so a bad figure is reported here, not dropped later
        return payload

    def _stats_loop(self) -> None:
        interval = self.site.stats_interval_s
        while not self._stop.wait(interval):
            try:
                for topic, payload in self.stats_messages():
                    self._publish_now(topic, payload, retain=False, qos=0)
            except Exception:  # logged, and tried again next interval
                log.exception("stats: failed")


def service_paths(loaded: LoadedSite) -> dict[str, Path]:
    """Where the service keeps its state (for `validate-config` to show)."""
    return {"outbox": loaded.site.outbox.path, "audit_log": loaded.site.audit_log}
