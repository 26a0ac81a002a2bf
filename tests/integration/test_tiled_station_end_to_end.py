"""`lineguard run` with a TILED station, end to end: a tiny OneNIP exported with a dynamic batch
through the real CLI, wide 400×160 frames replayed from a folder, a real mosquitto.

The tiny model is untrained (a random head; training belongs to other tests), so what is checked
is the wiring, not accuracy: the station runs every frame through the tiled pipeline (all tiles in
one batched OpenVINO call, per-tile prompts), and the regions it publishes are exactly those the
tiled `Pipeline` finds in-process on the same frame, in frame pixels, and differ from what the
square-resize pipeline would report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch
import yaml

from lineguard.runtime import events as ev
from lineguard.runtime.cli import main as lineguard
from lineguard.runtime.config import StationConfig
from lineguard.runtime.engine import load_engine
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.station import read_prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SIZE, W, H = 64, 400, 160


def tiny_checkpoint(path: Path, golden: np.ndarray) -> Path:
    from lineguard.train.checkpoint import save_checkpoint
    from lineguard.train.torch_model import OneNIP, OneNIPConfig

    cfg = OneNIPConfig(
        backbone="tf_efficientnet_lite0",
        input_size=SIZE,
        hidden_dim=16,
        nhead=2,
        dim_feedforward=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        refiner_channels=4,
    )
    torch.manual_seed(0)
    model = OneNIP(cfg).eval()
    small = cv2.resize(golden, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return save_checkpoint(
        path,
        {
            "format": "lineguard-onenip/1",
            "model_config": cfg.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "train_config": {},
            "classes": ["part"],
            "prompts": {"part": {"path": "golden.png", "image": small}},
            "calibration": {
                "image": {"center": 0.0, "scale": 1.0},
                "pixel": {"center": 0.0, "scale": 1.0},
                "count": 0,
            },
            "data_fingerprint": "test",
            "metrics": {},
            "epoch": 0,
        },
    )


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_lineguard_run_with_a_tiled_station(tmp_path, mosquitto) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.integers(60, 200, (H, W, 3)).astype(np.float32), (0, 0), 3)
    golden = base.astype(np.uint8)
    normal = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
    bad = normal.copy()
    bad[60:100, 300:306] = (250, 20, 20)  # a thin streak far right of the first model square
    write_rgb(tmp_path / "golden.png", golden)
    write_rgb(tmp_path / "frames" / "000.png", normal)
    write_rgb(tmp_path / "frames" / "001.png", bad)

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", golden)
    art = tmp_path / "artifact"
    assert (
        lineguard(["export", "--checkpoint", str(ckpt), "--out", str(art), "--dynamic-batch"]) == 0
    )

    station = {
        "station_id": "wide",
        "line_id": "line1",
        "model": str(art),
        "engine": "openvino",
        "precision": "fp32",
        "threads": 1,
        "camera": {"kind": "folder", "path": str(tmp_path / "frames"), "loop": False},
        "prompt": {"image": str(tmp_path / "golden.png")},
        "tiling": {"scale": 2.0, "overlap": 0.25},
        "debounce": {"consecutive": 1, "cooldown_s": 0},
        "evidence": {"mqtt": True},
    }
    # thresholds from the tiled pipeline's own map of the defective frame (in-process)
    engine = load_engine(art, "openvino", "fp32", threads=1)
    assert engine.runner.batch_images and engine.runner.batch_tokens
    prompt, _ = read_prompt(tmp_path / "golden.png", None)
    cfg = StationConfig.model_validate({**station, "thresholds": {"image": 1e-6, "pixel": 1.0}})
    probe = Pipeline(engine, prompt, thresholds=Thresholds(1e-6, 1.0, 1), tiling=cfg.tiling)
    pixel = float(np.quantile(probe.process(bad).score_map, 0.99))
    t = Thresholds(image=1e-6, pixel=pixel, min_area_px=4)
    tiled = Pipeline(engine, prompt, thresholds=t, tiling=cfg.tiling)
    expected = {i: tiled.process(f) for i, f in enumerate((normal, bad))}
    resized = Pipeline(engine, prompt, thresholds=t).process(bad)
    assert expected[1].score_map.shape == (80, 200)  # 400×160 at scale 2
    assert expected[1].regions and [r.to_dict() for r in resized.regions] != [
        r.to_dict() for r in expected[1].regions
    ]
    engine.close()

    station["thresholds"] = t.as_dict()
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(station))
    site = {
        "edge_id": "edge-test",
        "broker": {"host": "127.0.0.1", "port": mosquitto.port},
        "stations": [str(tmp_path / "wide.yaml")],
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
        "audit_log": str(tmp_path / "audit.jsonl"),
        "stats_interval_s": 1,
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))

    received: list[tuple[str, bytes]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    connected = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: (c.subscribe("lineguard/#", qos=1), connected.set())
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    assert connected.wait(10)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lineguard.runtime.cli",
            "run",
            "--site",
            str(tmp_path / "site.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120

        def ended() -> bool:
            return any(
                topic.endswith("/status")
                and json.loads(p).get("state") == "offline"
                and "end" in json.loads(p).get("reason", "")
                for topic, p in received
            )

        while time.time() < deadline and not ended() and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(2.0)  # let the publisher drain the last events
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        sub.loop_stop()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert ended(), err.decode()[-3000:]

    defects = [json.loads(p) for topic, p in received if topic.endswith("/defect")]
    for d in defects:
        assert ev.schema_errors("defect", d) == []
        assert d["frame_size"] == [W, H]
    got = {d["frame_id"]: d["regions"] for d in defects}
    want = {i: [r.to_dict() for r in dec.regions] for i, dec in expected.items() if dec.defective}
    assert 1 in want and got == want
    assert any(r["bbox"][0] >= 250 for r in got[1])  # frame pixels, far outside a 64-px square
