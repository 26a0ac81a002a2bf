"""Prometheus metrics of `lineguard run` on `/metrics`, with the official `prometheus_client`.

Why this shape: plants already run Prometheus/Grafana; MQTT stats suit the MES, not alerting on
a fleet. Per-frame cost is two histogram observations per station (a lock and a bucket search);
everything else (counters the stations keep anyway, outbox depth and oldest age, camera state,
thresholds in force) is read when Prometheus scrapes, so scraping never touches a frame thread.

Every per-station series has the labels `line` and `station`. Names (see docs/metrics.md):
frames, drops, defective frames, events, errors (counters); inference and capture-to-decision
latency (histograms, seconds); queue depth, station state, thresholds; outbox depth, oldest
age, drops; events waiting for the writer, commits, broker connection and published messages.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LABELS = ("line", "station")
STATES = ("online", "offline", "camera-lost")
#: Seconds; dense between 5 and 100 ms, where a 2-core PC at 15-60 fps per station lives.
LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)

#: station stats key -> (metric name without `_total`, help)
COUNTERS = {
    "frames": ("lineguard_frames_inspected", "Frames inspected (model run and decided)"),
    "frames_captured": ("lineguard_frames_captured", "Frames the camera delivered"),
    "dropped_frames": ("lineguard_frames_dropped", "Frames dropped by the bounded frame queue"),
    "defective_frames": ("lineguard_frames_defective", "Frames decided defective"),
    "events": ("lineguard_events", "Defect events committed to the outbox"),
    "errors": ("lineguard_errors", "Frames or events that failed (logged)"),
    "camera_reconnects": ("lineguard_camera_reconnects", "Camera reconnects"),
}


class StationMetrics:
    """One station's histogram children, bound once (no label lookup per frame)."""

    def __init__(self, inference: Any, decision: Any) -> None:
        self._inference, self._decision = inference, decision

    def observe(self, inference_s: float, decision_s: float) -> None:
        self._inference.observe(inference_s)
        self._decision.observe(decision_s)


class _ServiceCollector(Collector):
    """Reads the service's state at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self):
        svc = self.service
        counters = {k: CounterMetricFamily(n, h, labels=LABELS) for k, (n, h) in COUNTERS.items()}
        queue = GaugeMetricFamily("lineguard_queue_depth", "Frames waiting", labels=LABELS)
        state = GaugeMetricFamily(
            "lineguard_station_state",
            "1 for the station's current state (online, offline, camera-lost)",
            labels=(*LABELS, "state"),
        )
        thresholds = GaugeMetricFamily(
            "lineguard_threshold",
            "Thresholds in force (image, pixel: normalised units; min_area_px: map pixels)",
            labels=(*LABELS, "kind"),
        )
        for slot in list(svc.slots.values()):
            c, station = slot.config, slot.station
            labels = [c.line_id, c.station_id]
            for s in STATES:
                state.add_metric([*labels, s], 1.0 if slot.state == s else 0.0)
            if station is None:
                continue
            try:
                stats = station.stats()
                active = station.thresholds()
            except Exception:  # one station's failure never hides the others
                log.exception("metrics: station %s not read", c.station_id)
                continue
            for key, fam in counters.items():
                if stats.get(key) is not None:
                    fam.add_metric(labels, float(stats[key]))
            queue.add_metric(labels, float(stats.get("queue_depth") or 0))
            for kind in ("image", "pixel", "min_area_px"):
                if active.get(kind) is not None:
                    thresholds.add_metric([*labels, kind], float(active[kind]))
        yield from counters.values()
        yield from (queue, state, thresholds)
        yield from self._service_wide(svc)

    @staticmethod
    def _service_wide(svc: Any):
        box, writer, pub = svc.outbox, svc.writer, svc.publisher
        if box is not None:
            yield GaugeMetricFamily(
                "lineguard_outbox_depth", "Messages waiting for the broker's PUBACK", box.depth()
            )
            yield GaugeMetricFamily(
                "lineguard_outbox_oldest_age_seconds",
                "Age of the oldest undelivered message (0 when empty)",
                box.oldest_age_s(),
            )
            yield CounterMetricFamily(
                "lineguard_outbox_dropped", "Messages dropped by the outbox bounds", box.dropped
            )
        yield GaugeMetricFamily(
            "lineguard_event_writer_pending", "Events decided, not yet committed", writer.pending
        )
        yield CounterMetricFamily(
            "lineguard_outbox_commits", "Outbox transactions (fsyncs) of events", writer.commits
        )
        yield CounterMetricFamily(
            "lineguard_outbox_committed_events", "Events committed by the writer", writer.committed
        )
        connected = svc.link is not None and svc.link.connected
        yield GaugeMetricFamily(
            "lineguard_broker_connected", "1 when connected to the MQTT broker", float(connected)
        )
        yield CounterMetricFamily(
            "lineguard_messages_published",
            "Outbox messages acknowledged by the broker",
            0 if pub is None else pub.published,
        )


class RuntimeMetrics:
    """The registry of one `lineguard run` and its HTTP endpoint."""

    def __init__(self, service: Any, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry()  # scrape-time collector: no describe
        self._inference = Histogram(
            "lineguard_inference_seconds",
            "Time in the inference engine per frame",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._decision = Histogram(
            "lineguard_capture_to_decision_seconds",
            "From frame capture to the station's decision",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(service))
        self._server: Any = None

    def station(self, cfg: Any) -> StationMetrics:
        labels = (cfg.line_id, cfg.station_id)
        return StationMetrics(self._inference.labels(*labels), self._decision.labels(*labels))

    def serve(self) -> None:
        """Start serving `/metrics` on its own daemon thread."""
        self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        log.info("metrics: serving http://%s:%d/metrics", self.host, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
