"""Test helpers for the service/MQTT tests: a scripted station, a subscriber, site files.

`ScriptedStation` stands in for `lineguard.runtime.station.Station` (which needs a model
artifact): it makes the same callbacks with real payload builders, and decides "defective" with
its live thresholds, so threshold commands visibly change decisions. The broker is always real.

Run as a script it is the publishing process of the SIGKILL test:
`python runtime_fakes.py SITE_FILE PREFIX COUNT INTERVAL_S COMMITTED_LOG [--drain] [--run]`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lineguard.runtime import events as ev
from lineguard.runtime.config_loader import load_site

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


class ScriptedStation:
    """Implements the service's StationLike protocol without a camera or a model."""

    def __init__(self, config, edge_id, on_event, on_status, evidence_topic) -> None:
        self.config = config
        self.edge_id = edge_id
        self.on_event = on_event
        self.on_status = on_status
        self.evidence_topic = evidence_topic
        t = config.thresholds
        self._active = {
            "image": 1.0 if t.image is None else t.image,
            "pixel": 1.0 if t.pixel is None else t.pixel,
            "min_area_px": t.min_area_px,
        }
        self._shadow: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.frames = 0
        self.events = 0
        self.started = False

    # StationLike
    def start(self) -> None:
        self.started = True
        self.on_status("online", "")

    def stop(self) -> None:
        self.on_status("offline", "stopped")

    def stats(self) -> dict[str, Any]:
        return {
            "fps": 5.0,
            "latency_p50_ms": 12.0,
            "latency_p95_ms": 20.0,
            "frames": self.frames,
            "dropped_frames": 0,
            "events": self.events,
            "shadow": None,
        }

    def thresholds(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._active)

    def shadow(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._shadow is None else dict(self._shadow)

    def set_thresholds(self, image=None, pixel=None, min_area_px=None):
        with self._lock:
            for k, v in (("image", image), ("pixel", pixel), ("min_area_px", min_area_px)):
                if v is not None:
                    self._active[k] = v
            return dict(self._active)

    def set_shadow(self, image=None, pixel=None, min_area_px=None):
        with self._lock:
            if image is None and pixel is None:
                self._shadow = None
                return None
            self._shadow = {"image": image, "pixel": pixel, "min_area_px": min_area_px}
            return dict(self._shadow)

    # test driver
    def feed(self, score: float, event_id: str | None = None, with_jpeg: bool = False) -> bool:
        """One 'frame' with this image score; emits an event when defective."""
        self.frames += 1
        t = self.thresholds()
        if score < t["image"]:
            return False
        c = self.config
        payload = ev.defect_payload(
            edge_id=self.edge_id,
            line=c.line_id,
            station=c.station_id,
            frame_id=self.frames,
            captured_at=time.time(),
            image_score=score,
            thresholds=t,
            regions=[
                {
                    "bbox": [10, 12, 30, 20],
                    "area_px": 420.0,
                    "max_score": score,
                    "mean_score": score / 2,
                }
            ],
            model_sha256="ab" * 32,
            prompt_sha256="cd" * 32,
            frame_size=(640, 480),
            latency_ms=12.5,
            engine="openvino",
            precision="int8",
            event_id=event_id,
        )
        if with_jpeg:
            ev.attach_evidence(
                payload,
                JPEG,
                topic=self.evidence_topic(payload["event_id"]),
                path=None,
                size=(64, 48),
            )
        self.on_event(payload, JPEG if with_jpeg else None)
        self.events += 1
        return True


class RecordingLink:
    """Stands in for MqttLink: always connected, remembers what was published."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic, payload, qos=1, retain=False):
        self.sent.append((topic, payload, retain))

    def json(self, suffix: str) -> list[dict]:
        return [json.loads(p) for t, p, _ in self.sent if t.endswith(suffix)]


@contextmanager
def linked_service(folder: Path, **service_kw) -> Iterator[Any]:
    """A started `Service` on a one-station (s1) scripted site written into FOLDER, no broker,
    publishing into a `RecordingLink`; stopped on leaving."""
    from lineguard.runtime.service import Service

    site = write_site(folder, None)
    svc = Service(load_site(site, check_files=False), station_factory=ScriptedStation, **service_kw)
    svc.start()
    svc.link = RecordingLink()
    try:
        yield svc
    finally:
        svc.link = None
        svc.stop()


class Collector:
    """A subscriber with a persistent session (clean_session=False, QoS 1), so messages queued
    by the broker while it was away still arrive after a broker restart."""

    def __init__(
        self, host: str, port: int, topics: list[str], client_id: str = "collector", **tls_and_auth
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.by_topic: dict[str, list[bytes]] = defaultdict(list)
        self._cv = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.reconnect_delay_set(1, 1)
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        for t in self.topics:
            client.subscribe(t, qos=1)

    def _on_message(self, client, userdata, msg):
        with self._cv:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.by_topic[msg.topic].append(bytes(msg.payload))
            self._cv.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: predicate(self), timeout)

    def json(self, suffix: str) -> list[dict]:
        with self._cv:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def last(self, topic: str) -> bytes | None:
        with self._cv:
            values = self.by_topic.get(topic)
            return values[-1] if values else None

    def event_ids(self) -> list[str]:
        return [p["event_id"] for p in self.json("/defect")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_site(
    folder: Path, broker: dict | None, stations: tuple[str, ...] = ("s1",), extra_site: str = ""
) -> Path:
    """Site + station YAML in `folder`; returns the site file."""
    (folder / "stations").mkdir(parents=True, exist_ok=True)
    for sid in stations:
        (folder / "stations" / f"{sid}.yaml").write_text(
            f"station_id: {sid}\nline_id: line1\nmodel: ../model\n"
            "camera: {kind: folder, path: ../frames}\nprompt: {image: ../golden.png}\n"
            "thresholds: {image: 1.0, pixel: 0.8, min_area_px: 10}\n"
        )
    lines = ["edge_id: edge1", "stations: [stations/*.yaml]", "stats_interval_s: 0.5"]
    if broker is not None:
        lines.append("broker: " + json.dumps(broker))
    site = folder / "site.yaml"
    site.write_text("\n".join(lines) + "\n" + extra_site)
    return site


def _child(
    site_file: str,
    prefix: str,
    count: int,
    interval: float,
    log_path: str,
    drain: bool,
    until_signal: bool = False,
) -> int:
    """Publishing process for the SIGKILL test: emits events with ids `<prefix>`-derived, logs
    each id after `submit_event` returned (i.e. after the outbox commit)."""
    from lineguard.runtime.service import Service

    stations: list[ScriptedStation] = []

    def factory(*args):
        stations.append(ScriptedStation(*args))
        return stations[-1]

    service = Service(
        load_site(site_file, check_files=False), station_factory=factory, strict_schemas=True
    )
    if until_signal:  # `lineguard run` behaviour: run until SIGTERM/SIGINT, then stop cleanly

        def feed() -> None:
            while not stations or not stations[0].started:
                time.sleep(0.01)
            for i in range(count):
                stations[0].feed(5.0, event_id=f"{prefix}{i:012x}")
                time.sleep(interval)
            Path(log_path).write_text("fed\n")

        threading.Thread(target=feed, daemon=True).start()
        return service.run_forever()
    service.start()
    with open(log_path, "a", encoding="utf-8") as log:
        for i in range(count):
            event_id = f"{prefix}{i:012x}"
            stations[0].feed(5.0, event_id=event_id)
            log.write(event_id + "\n")
            log.flush()
            os.fsync(log.fileno())
            time.sleep(interval)
    if drain:
        deadline = time.monotonic() + 30
        while service.outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
    service.stop()
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = sys.argv[1:]
    sys.exit(_child(a[0], a[1], int(a[2]), float(a[3]), a[4], "--drain" in a, "--run" in a))
