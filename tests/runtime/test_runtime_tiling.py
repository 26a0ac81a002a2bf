"""Tiled inference (runtime/tiling.py + Pipeline(tiling=...)): the grid, exact stitching at seams,
per-tile prompts, and the acceptance case: a defect a few pixels wide on a 1000×400 frame is found
in frame coordinates by the tiled pipeline and lost by the square resize.

The engine is deterministic: its "tokens" are the prompt tile's pixels and its map is the mean
absolute difference to them, so what the pipelines see decides what they find."""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime_pipeline import make_card

from lineguard.runtime.config import StationConfig
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.tiling import (
    TilingConfig,
    axis_starts,
    cut,
    make_grid,
    stitch,
)

T = 128


class DiffEngine:
    """Map = mean |tile − prompt tile| / 255 per pixel; score = the map's max. Counts calls."""

    def __init__(self, batch: bool = True) -> None:
        self.card = make_card((T, T), img=(0.0, 1.0), pix=(0.0, 1.0))
        self.calls = 0
        self.encoded = 0
        if batch:
            self.detect_batch = self._detect_batch

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        assert rgb.shape == (T, T, 3)
        self.encoded += 1
        return rgb.astype(np.float32).reshape(1, T * T, 3)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray):
        self.calls += 1
        ref = np.asarray(tokens, np.float32).reshape(T, T, 3)
        m = np.abs(rgb.astype(np.float32) - ref).mean(-1) / 255.0
        return m, float(m.max())

    def _detect_batch(self, images: np.ndarray, tokens: np.ndarray):
        self.calls += 1
        ref = np.asarray(tokens, np.float32).reshape(len(images), T, T, 3)
        m = np.abs(images.astype(np.float32) - ref).mean(-1) / 255.0
        return m, m.reshape(len(m), -1).max(1)


def scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """A 1000×400 textured normal frame, the same frame with a 3-px wide, 40-px long dark
    scratch (plus sensor noise), and the scratch's box (x, y, w, h)."""
    rng = np.random.default_rng(seed)
    base = cv_blur(rng.integers(90, 170, (400, 1000, 3)).astype(np.float32))
    normal = base.astype(np.uint8)
    noisy = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
    box = (613, 171, 3, 40)
    x, y, w, h = box
    noisy[y : y + h, x : x + w] = 10
    return normal, noisy, box


def cv_blur(a: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(a, (0, 0), 2.0)


def test_axis_starts_cover_and_overlap():
    for length in (64, 65, 100, 1000, 4097):
        starts = axis_starts(length, T, 16)
        assert starts[0] == 0 and starts[-1] + T == max(length, T)
        gaps = np.diff(starts)
        assert (gaps <= T - 16).all() and (gaps > 0).all()


def test_grid_keeps_aspect_and_scale():
    g = make_grid(1000, 400, T, 2.0, 0.25)
    assert g.canvas_hw == (200, 500)
    assert g.n == len(g.xs) * len(g.ys) == len(g.origins)
    assert make_grid(30, 20, T, 1.0, 0.25).canvas_hw == (T, T)  # small ROI: one tile


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_stitching_a_constant_map_is_exact_at_seams(overlap):
    g = make_grid(1000, 400, T, 1.0, overlap)
    for c in (0.0, 0.3, 1.7, -2.25, 123.456):
        out = stitch(np.full((g.n, T, T), c, np.float32), g)
        assert out.shape == g.canvas_hw and out.dtype == np.float32
        assert (out == np.float32(c)).all()


def test_stitch_inverts_cut():
    g = make_grid(300, 150, T, 1.0, 0.3)
    canvas = np.random.default_rng(1).random(g.canvas_hw).astype(np.float32)
    np.testing.assert_allclose(stitch(cut(canvas, g), g), canvas, rtol=0, atol=1e-6)


def run(pipe: Pipeline, frame: np.ndarray):
    return pipe.process(frame)


def test_tiled_finds_a_thin_defect_that_the_square_resize_loses():
    normal, defective, (dx, dy, dw, dh) = scene()
    t = Thresholds(image=0.3, pixel=0.3, min_area_px=16)
    resized = Pipeline(DiffEngine(), normal, thresholds=t)
    engine = DiffEngine()
    tiled = Pipeline(engine, normal, thresholds=t, tiling=TilingConfig(scale=1.0, overlap=0.25))
    grid = make_grid(1000, 400, T, 1.0, 0.25)
    assert engine.encoded == grid.n  # one prompt per tile position, encoded once

    r = run(resized, defective)
    assert r.score_map.shape == (T, T)
    assert r.regions == [] and not r.defective  # the scratch is diluted below threshold
    assert r.image_score < 0.3

    d = run(tiled, defective)
    assert engine.calls == 1  # every tile of the frame in one batched call
    assert d.score_map.shape == (400, 1000)  # the stitched map in ROI (= frame) pixels
    assert d.defective and len(d.regions) == 1
    x, y, w, h = d.regions[0].bbox
    assert abs(x - dx) <= 1 and abs(y - dy) <= 1 and abs(w - dw) <= 2 and abs(h - dh) <= 2
    assert not run(tiled, normal).defective


def test_tiled_with_roi_scale_and_no_batch_reports_frame_pixels():
    normal, defective, (dx, dy, dw, dh) = scene(3)
    engine = DiffEngine(batch=False)
    roi = (0.5, 0.25, 0.5, 0.75)  # x 500..1000, y 100..400
    t = Thresholds(image=0.2, pixel=0.2, min_area_px=4)
    pipe = Pipeline(
        engine, normal, thresholds=t, roi=roi, tiling=TilingConfig(scale=1.5, overlap=0.3)
    )
    d = pipe.process(defective)
    g = make_grid(500, 300, T, 1.5, 0.3)
    assert engine.calls == g.n  # no detect_batch: one call per tile
    assert d.score_map.shape == g.canvas_hw and d.roi == (500, 100, 500, 300)
    assert d.defective
    x, y, w, h = d.regions[0].bbox
    assert x <= dx and y <= dy and x + w >= dx + dw and y + h >= dy + dh
    assert w <= dw + 6 and h <= dh + 6  # in frame pixels, a few pixels of the truth


def test_shared_prompt_encodes_once_and_any_frame_size_runs():
    normal, _, _ = scene()
    engine = DiffEngine()
    t = Thresholds(image=0.3, pixel=0.3)
    pipe = Pipeline(engine, normal, thresholds=t, tiling=TilingConfig(prompt="shared"))
    assert engine.encoded == 1
    assert pipe.process(normal[:200, :300].copy()).score_map.shape == (200, 300)


def test_per_tile_prompts_refuse_another_frame_size_and_too_many_tiles():
    normal, _, _ = scene()
    t = Thresholds(image=0.3, pixel=0.3)
    pipe = Pipeline(DiffEngine(), normal, thresholds=t, tiling=TilingConfig())
    with pytest.raises(ValueError, match="golden sample"):
        pipe.process(normal[:200].copy())
    with pytest.raises(ValueError, match="max_tiles"):
        Pipeline(DiffEngine(), normal, thresholds=t, tiling=TilingConfig(scale=0.5, max_tiles=8))


def test_min_area_limit_is_the_stitched_map():
    normal, _, _ = scene()
    t = Thresholds(image=0.3, pixel=0.3)
    pipe = Pipeline(DiffEngine(), normal, thresholds=t, tiling=TilingConfig(scale=2.0))
    assert pipe.max_area_px == 200 * 500


def test_station_config_tiling_section():
    base = {
        "station_id": "s1",
        "line_id": "l1",
        "model": "m",
        "camera": {"kind": "folder", "path": "f"},
        "prompt": {"image": "p.png"},
    }
    assert StationConfig.model_validate(base).tiling is None
    cfg = StationConfig.model_validate({**base, "tiling": {"scale": 2, "overlap": 0.5}})
    assert cfg.tiling == TilingConfig(scale=2.0, overlap=0.5)
    with pytest.raises(ValueError):
        StationConfig.model_validate({**base, "tiling": {"scael": 2}})
    with pytest.raises(ValueError):
        StationConfig.model_validate({**base, "tiling": {"overlap": 0.9}})


class CountingRunner:
    """A GraphRunner whose graph "computes" image mean + token mean; records each call's batch."""

    @staticmethod
    def make(batch_images: bool, batch_tokens: bool):
        from lineguard.runtime.graph_runner import GraphRunner

        class R(GraphRunner):
            input_size = (4, 4)

            def __init__(self) -> None:
                self.batch_images, self.batch_tokens, self.calls = batch_images, batch_tokens, []

            def detect(self, rgb, tokens):
                self.calls.append((1, tokens.shape[0]))
                return np.full((4, 4), rgb.mean() + tokens.mean(), np.float32), float(rgb.mean())

            def _run_batch(self, imgs, toks):
                self.calls.append((len(imgs), len(toks)))
                m = imgs.mean(axis=(1, 2, 3)) + toks.mean(axis=(1, 2))
                return np.repeat(m, 16).reshape(len(imgs), 1, 4, 4), imgs.mean(axis=(1, 2, 3))

        return R()


@pytest.mark.parametrize(
    ("images", "tokens", "per_tile", "calls"),
    [
        (True, True, True, [(3, 3)]),  # dynamic artifact: one call, tokens alongside
        (True, True, False, [(3, 3)]),  # a shared prompt is repeated to the batch
        (True, False, False, [(3, 1)]),  # only images batched: fine for a shared prompt
        (True, False, True, [(1, 1)] * 3),  # ... but per-tile tokens need one call each
        (False, False, True, [(1, 1)] * 3),  # static batch-1 artifact: one call per tile
    ],
)
def test_detect_batch_batches_when_the_graph_allows(images, tokens, per_tile, calls):
    runner = CountingRunner.make(images, tokens)
    imgs = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    toks = np.arange(3, dtype=np.float32).reshape(3, 1, 1) * np.ones((3, 2, 5), np.float32)
    if not per_tile:
        toks = toks[:1]
    maps, scores = runner.detect_batch(imgs, toks)
    assert runner.calls == calls
    expect = np.array([10, 20, 30]) + (np.arange(3) if per_tile else 0)
    np.testing.assert_allclose(maps[:, 0, 0], expect)
    np.testing.assert_allclose(scores, [10, 20, 30])
