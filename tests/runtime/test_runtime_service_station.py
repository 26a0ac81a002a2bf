"""The service with the real `Station` (real folder camera, threads, regions, evidence) and a
real broker; only the inference engine is a stand-in ("red = anomalous"), since the model
artifact comes from the compress stage. Checks the service <-> station contract end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from runtime_fakes import Collector

from lineguard.runtime import events as ev
from lineguard.runtime.artifact import ModelCard
from lineguard.runtime.config_loader import load_site
from lineguard.runtime.service import Service
from lineguard.runtime.station import Station

W, H = 160, 120
SQUARE = (60, 30, 40, 30)  # x, y, w, h of the red defect in frame pixels


class RedEngine:
    """Anomaly = how much redder than green a pixel is; image score = max of the map."""

    def __init__(self) -> None:
        graph = {"inputs": [], "outputs": [], "files": {}}
        norm = {"center": 0.0, "scale": 0.1}
        self.card = ModelCard.model_validate(
            {
                "name": "red",
                "created": "2026-01-01T00:00:00Z",
                "input_size": [32, 32],
                "resize": "cv2-area",
                "backbone": "none",
                "classes": ["part"],
                "prompt_encoder": graph,
                "detector": graph,
                "score_normalization": {"image": norm, "pixel": norm, "source": "t", "count": 1},
                "thresholds": {"image": 2.0, "pixel": 2.0},
                "sha256": {},
            }
        )

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        return rgb.astype(np.float32).mean(axis=(0, 1))[None, None, :]

    def detect(self, rgb: np.ndarray, tokens: np.ndarray):
        m = np.clip(rgb[..., 0].astype(np.float32) - rgb[..., 1], 0, None) / 255.0
        return m, float(m.max())

    def close(self) -> None:
        pass


def _image(defect: bool) -> np.ndarray:
    rgb = np.full((H, W, 3), 120, np.uint8)
    if defect:
        x, y, w, h = SQUARE
        rgb[y : y + h, x : x + w] = (250, 50, 50)
    return rgb


def _site(tmp_path: Path, port: int) -> Path:
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, c in enumerate("NNDN"):
        cv2.imwrite(str(frames / f"f{i}.png"), cv2.cvtColor(_image(c == "D"), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "golden.png"), cv2.cvtColor(_image(False), cv2.COLOR_RGB2BGR))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    (tmp_path / "st1.yaml").write_text(
        "station_id: st1\nline_id: line1\nmodel: model\n"
        "camera: {kind: folder, path: frames, fps: 20, loop: true}\n"
        "prompt: {image: golden.png}\n"
        "thresholds: {image: 2.0, pixel: 2.0, min_area_px: 4}\n"
        "evidence: {mqtt: true, max_bytes: 20000, save_dir: evidence}\n"
    )
    site = tmp_path / "site.yaml"
    site.write_text(
        f"edge_id: edge1\nstations: [st1.yaml]\nstats_interval_s: 0.5\n"
        f"broker: {{host: 127.0.0.1, port: {port}, reconnect_min_s: 1, reconnect_max_s: 2}}\n"
    )
    return site


def _factory(cfg, edge_id, on_event, on_status, evidence_topic):
    return Station(
        cfg,
        edge_id=edge_id,
        on_event=on_event,
        on_status=on_status,
        evidence_topic=evidence_topic,
        engine=RedEngine(),
    )


def test_real_station_events_evidence_stats_and_live_threshold(tmp_path, mosquitto):
    service = Service(
        load_site(_site(tmp_path, mosquitto.port)), station_factory=_factory, strict_schemas=True
    )
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="st-collector")
    try:
        service.start()
        assert sub.wait_for(lambda c: len(c.event_ids()) >= 3, 20)
        events = sub.json("/defect")
        for p in events:
            assert ev.schema_errors("defect", p) == []
            (region,) = p["regions"]
            x, y, w, h = region["bbox"]
            sx, sy, sw, sh = SQUARE  # the region sits on the defect
            assert abs(x - sx) <= 6 and abs(y - sy) <= 6 and abs(w - sw) <= 8 and abs(h - sh) <= 8
            assert p["evidence"]["topic"] == f"lineguard/line1/st1/evidence/{p['event_id']}"
            assert Path(p["evidence"]["path"]).is_file()
            assert p["frame_size"] == [W, H]
        first = events[0]
        topic = first["evidence"]["topic"]
        assert sub.wait_for(lambda c: c.last(topic) is not None, 10)
        jpeg = sub.last(topic)
        assert len(jpeg) == first["evidence"]["bytes"] and jpeg[:2] == b"\xff\xd8"
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None

        assert sub.wait_for(lambda c: any(s["frames"] > 0 for s in c.json("/st1/stats")), 10)
        stats = [s for s in sub.json("/st1/stats") if s["frames"] > 0][-1]
        assert ev.schema_errors("stats", stats) == [] and stats["fps"] > 0
        assert stats["events"] >= 1 and stats["state"] == "online"

        # Raise the image threshold over MQTT: the station stops alerting from the next frame.
        cmd = {"image": 50.0, "by": "test", "reason": "mute", "request_id": "q1"}
        sub.client.publish("lineguard/line1/st1/threshold/set", json.dumps(cmd), qos=1)
        assert sub.wait_for(
            lambda c: any(s["request_id"] == "q1" for s in c.json("/threshold/state")), 10
        )
        station = service.slots["st1"].station
        assert station.thresholds()["image"] == 50.0
        frames_then = station.frames
        count_then = len(sub.event_ids())
        deadline = time.monotonic() + 20
        while station.frames < frames_then + 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert station.frames >= frames_then + 12  # three loops of the folder, two defects each
        while service.outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.outbox.depth() == 0
        new = sub.json("/defect")[count_then:]
        assert len(new) <= 1 and all(p["thresholds"]["image"] == 2.0 for p in new)
        assert service.audit.entries("st1")[-1]["new"]["active"]["image"] == 50.0
    finally:
        service.stop()
        sub.close()
    assert b'"state":"offline"' in sub.last("lineguard/line1/st1/status")


def test_lost_camera_status_over_mqtt_and_other_station_unaffected(tmp_path, mosquitto):
    """Issue 4: a camera that disappears sets retained `camera-lost` within 5 s and `online`
    again when it returns; the other station keeps inspecting meanwhile."""
    site = _site(tmp_path, mosquitto.port)
    (tmp_path / "frames2").mkdir()
    for i in range(3):
        cv2.imwrite(
            str(tmp_path / "frames2" / f"g{i}.png"), cv2.cvtColor(_image(False), cv2.COLOR_RGB2BGR)
        )
    (tmp_path / "st2.yaml").write_text(
        (tmp_path / "st1.yaml").read_text().replace("st1", "st2").replace("frames,", "frames2,")
    )
    for name in ("st1.yaml", "st2.yaml"):  # lose a camera quickly
        p = tmp_path / name
        p.write_text(p.read_text().replace("loop: true}", "loop: true, lost_after_s: 1.0}"))
    site.write_text(site.read_text().replace("[st1.yaml]", "[st1.yaml, st2.yaml]"))
    service = Service(load_site(site), station_factory=_factory, strict_schemas=True)
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="lost-collector")

    def state(c, station: str) -> str | None:
        body = c.last(f"lineguard/line1/{station}/status")
        return json.loads(body)["state"] if body else None

    try:
        service.start()
        assert sub.wait_for(lambda c: state(c, "st2") == "online", 10)
        (tmp_path / "frames2").rename(tmp_path / "frames2.gone")
        t0 = time.monotonic()
        assert sub.wait_for(lambda c: state(c, "st2") == "camera-lost", 10)
        assert time.monotonic() - t0 < 5.0
        lost = json.loads(sub.last("lineguard/line1/st2/status"))
        assert ev.schema_errors("status", lost) == [] and lost["reason"]
        st1 = service.slots["st1"].station
        before = st1.frames
        time.sleep(1.5)
        assert st1.frames > before and state(sub, "st1") == "online"  # unaffected
        (tmp_path / "frames2.gone").rename(tmp_path / "frames2")
        assert sub.wait_for(lambda c: state(c, "st2") == "online", 15)
    finally:
        service.stop()
        sub.close()
    # retained: a new subscriber sees the last state at once
    late = Collector("127.0.0.1", mosquitto.port, ["lineguard/+/+/status"], client_id="late")
    try:
        assert late.wait_for(lambda c: c.last("lineguard/line1/st2/status") is not None, 5)
    finally:
        late.close()
