"""Evidence JPEG: bounded size, boxes where the regions are; on-disk store retention."""

from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest

from lineguard.runtime.evidence import EvidenceStore, encode_bounded, render_overlay
from lineguard.runtime.regions import Region


def _noisy(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("max_bytes", [2_000, 10_000, 60_000])
def test_jpeg_fits_the_byte_budget(max_bytes):
    img = _noisy(960, 1280)  # noise is the worst case for JPEG
    data, (w, h) = encode_bounded(img, max_bytes)
    assert len(data) <= max_bytes
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (h, w, 3)
    assert w / h == pytest.approx(1280 / 960, rel=0.05)  # shrunk, not distorted


def test_small_budget_shrinks_large_budget_keeps_size():
    img = _noisy(240, 320)
    _, small = encode_bounded(img, 2_000)
    _, large = encode_bounded(img, 1_000_000)
    assert small[0] < 320 and large == (320, 240)


def test_impossible_budget_is_an_error():
    with pytest.raises(ValueError, match="cannot fit"):
        encode_bounded(_noisy(64, 64), 50)


def test_overlay_boxes_and_heat_where_the_region_is():
    frame = np.full((400, 800, 3), 128, np.uint8)
    score_map = np.zeros((50, 100), np.float32)
    score_map[10:20, 40:60] = 3.0
    region = Region(
        bbox=(300, 50, 100, 50), area_px=5000, max_score=3, mean_score=3, area_input_px=200
    )
    out = render_overlay(frame, score_map, (100, 0, 500, 250), [region], 1.0, max_side=400)
    assert out.shape == (200, 400, 3)  # scaled to max_side
    # Box outline (red in BGR) at the region's scaled left edge x=150, y 25..50.
    assert out[35, 150].tolist() == [0, 0, 255]
    # Heat: the scored area (ROI x 100+40·5=300.., y 50..) is coloured, a normal area is not.
    assert out[37, 175].tolist() != [128, 128, 128]
    assert out[150, 350].tolist() == [128, 128, 128]


def test_store_saves_atomically_and_prunes_by_age_and_count(tmp_path):
    store = EvidenceStore(tmp_path / "ev", retention_days=1.0, max_files=3, prune_interval_s=3600)
    now = time.time()
    paths = [store.save(f"e{i}", b"\xff\xd8jpeg" + bytes([i]), now=now) for i in range(5)]
    assert all(p.is_file() for p in paths)
    assert not list((tmp_path / "ev").glob("*.tmp"))
    for i, p in enumerate(paths):  # e0 two days old, others minutes apart
        age = 2 * 86400 if i == 0 else (5 - i) * 60
        os.utime(p, (now - age, now - age))
    removed = store.prune(now)
    left = sorted(p.name for p in (tmp_path / "ev").iterdir())
    assert removed == 2 and left == ["e2.jpg", "e3.jpg", "e4.jpg"]  # e0 too old, e1 over count


def test_store_prunes_on_save_at_most_every_interval(tmp_path):
    store = EvidenceStore(tmp_path, retention_days=1.0, prune_interval_s=100)
    old = store.save("old", b"x", now=1_000_000.0)
    os.utime(old, (0, 0))
    store.save("a", b"x", now=1_000_050.0)  # within the interval: no listing
    assert old.exists()
    store.save("b", b"x", now=1_000_200.0)
    assert not old.exists()
