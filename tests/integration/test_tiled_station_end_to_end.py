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

import cv2
import numpy as np
import pytest
import torch
import yaml
from site_replay import replay_site, stations_ended, write_site
from synthetic_parts import random_checkpoint, write_rgb

from lineguard.runtime import events as ev
from lineguard.runtime.cli import main as lineguard
from lineguard.runtime.config import StationConfig
from lineguard.runtime.engine import load_engine
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.station import read_prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SIZE, W, H = 64, 400, 160


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

    small = cv2.resize(golden, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    prompts = {"part": {"path": "golden.png", "image": small}}
    ckpt = random_checkpoint(tmp_path / "tiny.pt", SIZE, ["part"], prompts)
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
    site = write_site(tmp_path, mosquitto.port, [str(tmp_path / "wide.yaml")])
    received, rc, err = replay_site(site, mosquitto.port, lambda r: stations_ended(r) >= 1)
    assert rc == 0, err
    assert stations_ended(received) >= 1, err

    defects = [json.loads(p) for topic, p in received if topic.endswith("/defect")]
    for d in defects:
        assert ev.schema_errors("defect", d) == []
        assert d["frame_size"] == [W, H]
    got = {d["frame_id"]: d["regions"] for d in defects}
    want = {i: [r.to_dict() for r in dec.regions] for i, dec in expected.items() if dec.defective}
    assert 1 in want and got == want
    assert any(r["bbox"][0] >= 250 for r in got[1])  # frame pixels, far outside a 64-px square
