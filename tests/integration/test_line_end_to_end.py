"""The whole line on generated parts: train -> export -> runtime -> real broker -> events.

A tiny OneNIP is trained on normal images of two generated "products" and exported through the
real CLI (parity gate included); then `lineguard run` replays held-out normal and defective
frames through the OpenVINO FP32 artifact (INT8 of a 1-layer toy model is refused by the
accuracy gate, as it should be; INT8 is covered by tests/compress), one station per product,
into a mosquitto the test starts.
Issue 4's first acceptance item: defect events for defective frames with regions on the defects,
no events for normal frames at the configured threshold, every payload valid against its schema.
The threshold comes from `lineguard calibrate` on separate NORMAL frames (never the test frames).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from site_replay import replay_site, stations_ended, write_site
from synthetic_parts import CLASSES, SIZE, normal_image, tiny_config, write_rgb

from lineguard.runtime import events as ev
from lineguard.runtime.cli import main as lineguard
from lineguard.train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

N_GOOD, N_BAD = 6, 6


def with_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """A clearly visible blob; returns the image and the blob's bbox (x, y, w, h)."""
    out = img.copy()
    c = rng.integers(SIZE // 4, 3 * SIZE // 4, 2)
    axes = (int(rng.integers(7, 12)), int(rng.integers(5, 9)))
    colour = (int(rng.integers(0, 60)), int(rng.integers(0, 60)), int(rng.integers(200, 255)))
    cv2.ellipse(out, (int(c[0]), int(c[1])), axes, 0, 0, 360, colour, -1)
    ys, xs = np.nonzero(np.any(out != img, axis=-1))
    return out, (int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1))


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Train and export; write held-out frames per station. Returns paths and truths."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("line")
    rng = np.random.default_rng(7)
    folders = []
    for ci, name in enumerate(CLASSES):
        for i in range(24):
            write_rgb(root / "train" / name / f"{i:03d}.png", normal_image(ci, rng))
        folders.append({"path": str(root / "train" / name), "category": name})
    cfg = tiny_config({"folders": folders}, root / "run", epochs=15, threads=2)
    checkpoint = Trainer(cfg, progress=False).fit()
    art = root / "artifact"
    assert lineguard(["export", "--checkpoint", str(checkpoint), "--out", str(art)]) == 0
    assert (art / "model.json").is_file()

    truths: dict[str, dict[str, tuple | None]] = {}
    for ci, name in enumerate(CLASSES):
        frames = root / "frames" / name
        truths[name] = {}
        for i in range(N_GOOD):  # interleave normal and defective frames
            write_rgb(frames / f"{2 * i:03d}_good.png", normal_image(ci, rng))
            truths[name][f"{2 * i:03d}_good"] = None
            bad, bbox = with_defect(normal_image(ci, rng), rng)
            write_rgb(frames / f"{2 * i + 1:03d}_bad.png", bad)
            truths[name][f"{2 * i + 1:03d}_bad"] = bbox
        for i in range(24):  # separate normal captures for calibration only
            write_rgb(root / "calib" / name / f"{i:03d}.png", normal_image(ci, rng))
    return root, art, truths


def write_line_site(root: Path, art: Path, port: int) -> Path:
    stations = []
    for name in CLASSES:
        station = {
            "station_id": name,
            "line_id": "line1",
            "model": str(art),
            "engine": "openvino",
            "precision": "fp32",
            "threads": 1,
            "camera": {"kind": "folder", "path": str(root / "frames" / name), "loop": False},
            "prompt": {"image": str(art / "prompts" / f"{name}.png")},
            "thresholds": {"image": 1.0, "pixel": 1.0, "min_area_px": 4},
            "debounce": {"consecutive": 1, "cooldown_s": 0},
            "evidence": {"mqtt": True},
        }
        path = root / "stations" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(station))
        stations.append(str(path))
    return write_site(root, port, stations)


def test_replay_raises_events_on_defects_only(line, mosquitto) -> None:
    root, art, truths = line
    site = write_line_site(root, art, mosquitto.port)
    for name in CLASSES:  # thresholds from separate normal frames through the station's pipeline
        rc = lineguard(
            [
                "calibrate",
                "--station",
                str(root / "stations" / f"{name}.yaml"),
                "--site",
                str(site),
                "--folder",
                str(root / "calib" / name),
                "--target-far",
                "0.01",
                "--out",
                str(root / "calib-report" / name),
                "--apply",
                "config",
                "--by",
                "test",
                "--reason",
                "initial calibration",
            ]
        )
        assert rc == 0

    received, rc, err = replay_site(
        site, mosquitto.port, lambda r: stations_ended(r) >= len(CLASSES)
    )
    assert rc == 0, err

    defects = [json.loads(p) for t, p in received if t.endswith("/defect")]
    for topic, payload in received:  # every JSON payload is valid against its schema
        kind = topic.rsplit("/", 1)[-1]
        if kind in ("defect", "status", "stats"):
            assert ev.schema_errors(kind, json.loads(payload)) == [], (topic, payload[:200])
    by_station: dict[str, list[dict]] = {name: [] for name in CLASSES}
    for d in defects:
        by_station[d["station"]].append(d)
    for name in CLASSES:
        frames = sorted(truths[name])
        alerted = set()
        for d in by_station[name]:
            stem = frames[d["frame_id"]] if d["frame_id"] < len(frames) else None
            alerted.add(stem)
            bbox = truths[name].get(stem)
            assert bbox is not None, f"{name}: event on a normal frame {stem}: {d['image_score']}"
            bx, by, bw, bh = bbox  # some region must overlap the drawn defect
            assert any(
                r["bbox"][0] < bx + bw
                and bx < r["bbox"][0] + r["bbox"][2]
                and r["bbox"][1] < by + bh
                and by < r["bbox"][1] + r["bbox"][3]
                for r in d["regions"]
            ), (name, stem, d["regions"], bbox)
        bad = {s for s, b in truths[name].items() if b is not None}
        assert len(alerted & bad) >= len(bad) - 1, f"{name}: alerts on {sorted(alerted)}"
    ids = [d["event_id"] for d in defects]
    assert len(ids) == len(set(ids))
