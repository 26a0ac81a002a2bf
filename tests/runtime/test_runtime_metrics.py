"""Issue 13 part 4: `lineguard run --metrics-port N` serves Prometheus `/metrics` while it runs:
a real `lineguard run` process (tiny real ONNX artifact, shared engine, event writer), a real
mosquitto, scraped twice; the frame and event counters move, the per-station series carry
their labels, the outbox and threshold gauges are there."""

from __future__ import annotations

import socket
import time
import urllib.request

import numpy as np
import pytest
from calibration_fixtures import (
    LOW,
    defect_image,
    lineguard_run,
    make_artifact,
    write_images,
    write_site,
    write_station,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_endpoint_counters_move(tmp_path, mosquitto) -> None:
    art = make_artifact(tmp_path / "artifact")
    rng = np.random.default_rng(3)
    frames = write_images(tmp_path / "frames", [defect_image(rng) for _ in range(8)])
    cam = f"{{kind: folder, path: {frames}, fps: 20, loop: true}}"
    for sid in ("s1", "s2"):
        write_station(tmp_path / "stations", art, station_id=sid, camera=cam, thresholds=LOW)
    broker = {"host": "127.0.0.1", "port": mosquitto.port}
    site = write_site(tmp_path, "stations/*.yaml", broker=broker)
    with socket.socket() as sock:  # a free loopback port for /metrics
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    labels = {"line": "line1", "station": "s1"}
    with lineguard_run(site, tmp_path / "runtime.log", "--metrics-port", str(port)) as proc:
        first = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "runtime.log").read_text()[-3000:]
            try:
                first = _scrape(port)
            except OSError:
                first = None
            if first and (_value(first, "lineguard_events_total", **labels) or 0) > 0:
                break
            time.sleep(0.3)
        assert first, (tmp_path / "runtime.log").read_text()[-3000:]
        time.sleep(1.5)
        second = _scrape(port)
        for sid in ("s1", "s2"):
            lab = {"line": "line1", "station": sid}
            for name in ("lineguard_frames_inspected_total", "lineguard_events_total"):
                a, b = _value(first, name, **lab) or 0, _value(second, name, **lab)
                assert b is not None and b > a, (name, sid, a, b)
            assert _value(second, "lineguard_frames_dropped_total", **lab) is not None
            assert _value(second, "lineguard_capture_to_decision_seconds_count", **lab) > 0
            assert _value(second, "lineguard_inference_seconds_count", **lab) > 0
            assert _value(second, "lineguard_station_state", state="online", **lab) == 1.0
            assert _value(second, "lineguard_threshold", kind="image", **lab) == 0.001
        assert _value(second, "lineguard_outbox_depth") is not None
        assert _value(second, "lineguard_outbox_oldest_age_seconds") is not None
        assert _value(second, "lineguard_broker_connected") == 1.0
        commits = _value(second, "lineguard_outbox_commits_total")
        assert commits and _value(second, "lineguard_outbox_committed_events_total") >= commits
    assert proc.returncode == 0, (tmp_path / "runtime.log").read_text()[-3000:]
