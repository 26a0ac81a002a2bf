"""Tiled evaluation and the per-position tile dataset (train/tiles.py, `lineguard evaluate
--tile-scale`, `lineguard data tile`): maps at the ORIGINAL image size, tile-aligned prompts, and a
thin defect that the square resize washes out but the tiled evaluation localises."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from synthetic_parts import random_checkpoint
from test_train_evaluate import SIZE, StandIn

from lineguard.runtime.tiling import TilingConfig, make_grid
from lineguard.train.data import scan_mvtec
from lineguard.train.evaluate import evaluate_checkpoint
from lineguard.train.tiles import tile_dataset

W, H = 240, 100  # wide, non-square frames


def make_wide(root: Path, seed: int = 0) -> Path:
    """MVTec layout, class `strip`: a fixed texture + noise; defects are 2-px wide dark lines."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(80, 180, (H, W, 3)).astype(np.float32), (0, 0), 1.5)

    def shot() -> np.ndarray:
        return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)

    cat = root / "strip"
    for sub in ("train/good", "test/good", "test/line", "ground_truth/line"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        cv2.imwrite(str(cat / "train/good" / f"{i:03d}.png"), shot())
        cv2.imwrite(str(cat / "test/good" / f"{i:03d}.png"), shot())
    for i in range(3):
        img, mask = shot(), np.zeros((H, W), np.uint8)
        x, y = int(rng.integers(20, W - 22)), int(rng.integers(10, H - 40))
        img[y : y + 30, x : x + 2] = 5
        mask[y : y + 30, x : x + 2] = 255
        cv2.imwrite(str(cat / "test/line" / f"{i:03d}.png"), img)
        cv2.imwrite(str(cat / "ground_truth/line" / f"{i:03d}_mask.png"), mask)
    return root


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return make_wide(tmp_path_factory.mktemp("wide") / "parts")


def test_tiled_evaluation_maps_at_original_size_beat_the_resize(wide, tmp_path):
    kw = dict(model=StandIn(), input_size=SIZE, device="cpu", progress=False)
    resized = evaluate_checkpoint(None, wide, **kw)
    model = StandIn()
    kw["model"] = model
    tiling = TilingConfig(scale=1.0, overlap=0.25)
    tiled = evaluate_checkpoint(None, wide, save_maps=tmp_path / "maps", tiling=tiling, **kw)
    grid = make_grid(W, H, SIZE, 1.0, 0.25)
    assert tiled["tiles_per_image"] == grid.n and tiled["maps_at"] == "original image size"
    # prompts: the class's first training image cut with the same grid, each position once
    assert np.concatenate(model.encoded).shape == (grid.n, SIZE, SIZE, 3)
    assert all(s[0] <= grid.n for s in model.token_shapes)
    saved = np.load(tmp_path / "maps" / "strip" / "line" / "000.npy")
    assert saved.shape == (H, W) and saved.dtype == np.float32
    assert (tmp_path / "maps" / "scores.csv").read_text().count("\n") == 7
    mask = cv2.imread(str(wide / "strip/ground_truth/line/000_mask.png"), 0) > 0
    assert saved[mask].mean() > 3 * saved[~mask].mean()  # the line is where the map is high
    assert tiled["mean"]["pixel_ap"] >= resized["mean"]["pixel_ap"] + 0.2
    assert tiled["mean"]["image_auroc"] >= resized["mean"]["image_auroc"]


def test_tiled_evaluation_refuses_packs_and_extras(wide, tmp_path):
    kw = dict(model=StandIn(), input_size=SIZE, device="cpu", progress=False)
    with pytest.raises(Exception, match="dataset roots"):
        evaluate_checkpoint(None, tmp_path / "x.npz", tiling=TilingConfig(), **kw)
    with pytest.raises(Exception, match="tiling"):
        evaluate_checkpoint(None, wide, tiling=TilingConfig(), random_prompts=2, **kw)


def test_cli_evaluate_tiled_with_a_real_onenip(wide, tmp_path, capsys):
    from lineguard.runtime.cli import main

    ckpt = random_checkpoint(tmp_path / "tiny.pt", SIZE, ["strip"], {})
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(wide),
            "--tile-scale",
            "2",
            "--tile-prompt",
            "shared",
            "--save-maps",
            str(tmp_path / "maps"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert np.load(tmp_path / "maps/strip/good/001.npy").shape == (H, W)


def test_tile_dataset_one_category_per_position(wide, tmp_path):
    tiling = TilingConfig(scale=1.0, overlap=0.25)
    counts = tile_dataset(wide, tmp_path / "tiles", SIZE, tiling)
    grid = make_grid(W, H, SIZE, 1.0, 0.25)
    assert len(counts) == grid.n and set(counts.values()) == {3}
    assert "strip@r0c0" in counts
    samples = scan_mvtec(tmp_path / "tiles")  # a dataset the trainer reads as it is
    assert len(samples) == 3 * grid.n
    img = cv2.imread(str(samples[0].path))
    assert img.shape == (SIZE, SIZE, 3)


def test_per_position_rulers_from_validation_tiles_lift_the_image_auroc(tmp_path):
    """One tile position is noisy on every normal frame; the defects (thin lines) sit
    elsewhere. With the plain max the noisy position decides every frame's score; on
    per-position rulers fitted on held-out validation tiles the lines stand out."""
    from lineguard.runtime.tiling import cut, to_canvas
    from lineguard.train.tiles import evaluate_tiled

    rng = np.random.default_rng(3)
    base = cv2.GaussianBlur(rng.integers(80, 180, (H, W, 3)).astype(np.float32), (0, 0), 1.5)
    grid = make_grid(W, H, SIZE, 1.0, 0.25)
    noisy = (slice(0, SIZE - 8), slice(0, SIZE - 8))  # inside the first tile only

    def shot() -> np.ndarray:
        img = base + rng.normal(0, 2, base.shape)
        img[noisy] += rng.normal(0, 60, img[noisy].shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    cat = tmp_path / "parts" / "strip"
    for sub in ("train/good", "test/good", "test/line", "ground_truth/line"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(cat / "train/good/000.png"), base.astype(np.uint8))  # the prompt
    for i in range(10):
        cv2.imwrite(str(cat / "test/good" / f"{i:03d}.png"), shot())
        img, mask = shot(), np.zeros((H, W), np.uint8)
        x, y = int(rng.integers(W - 60, W - 10)), int(rng.integers(10, H - 40))
        img[y : y + 30, x : x + 2] = np.clip(img[y : y + 30, x : x + 2] - 40.0, 0, 255)
        mask[y : y + 30, x : x + 2] = 255
        cv2.imwrite(str(cat / "test/line" / f"{i:03d}.png"), img)
        cv2.imwrite(str(cat / "ground_truth/line" / f"{i:03d}_mask.png"), mask)
    held_out = [cut(to_canvas(shot(), grid), grid) for _ in range(24)]
    val = {
        f"strip@r{k // len(grid.xs)}c{k % len(grid.xs)}": np.stack([t[k] for t in held_out])
        for k in range(grid.n)
    }
    samples = scan_mvtec(tmp_path / "parts")
    tiling = TilingConfig(scale=1.0, overlap=0.25)
    kw = dict(prompt="first", progress=False, size=SIZE)
    plain, _, _ = evaluate_tiled(StandIn(), samples, tiling, "cpu", **kw)
    ruled, _, _ = evaluate_tiled(StandIn(), samples, tiling, "cpu", val=val, **kw)
    assert plain["image_score"]["strip"].startswith("max over tiles")
    assert ruled["image_score"]["strip"].startswith("ruled max")
    a_plain, a_ruled = plain["mean"]["image_auroc"], ruled["mean"]["image_auroc"]
    assert a_ruled > 0.9 and a_ruled > a_plain + 0.2, (a_plain, a_ruled)
    # the maps do not change: only how a frame's tiles make its one score
    assert ruled["mean"]["pixel_ap"] == pytest.approx(plain["mean"]["pixel_ap"])
    # too few held-out tiles to rule a position: the plain max, said so
    few = {k: v[:5] for k, v in val.items()}
    fallback, _, _ = evaluate_tiled(StandIn(), samples, tiling, "cpu", val=few, **kw)
    assert fallback["image_score"]["strip"].startswith("max over tiles")
    assert fallback["mean"]["image_auroc"] == pytest.approx(a_plain)
