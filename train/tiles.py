"""Training and evaluation at the scale of the defect: images cut into tiles with a grid position.

Why: squashing a 1130×460 frame into one square model input hides pits a few pixels wide and
distorts the aspect ratio. The same grid as a tiled station (`lineguard.runtime.tiling`) is used
here, so the model is judged on exactly what the edge will run:

* `evaluate_tiled`: every test image at its ORIGINAL size is cut into tiles, each tile is scored
  against the same-position tile of its class's normal prompt image (tokens encoded once per
  class and grid), the tile maps are stitched with overlap blending and resized to the original
  image size, and the metrics are computed there (so any method can be compared at full size).
* per-position rulers: for a model trained per grid position (below), each tile's score is read
  on its position's ruler before the max, fitted on that position's held-out VALIDATION tiles
  with the rule a station's `lineguard calibrate --positions` uses
  (`lineguard.runtime.calibration.positions`); otherwise the image score is the plain max.
* `tile_dataset`: a data-level training option that needs no trainer change. Normal training
  images are cut at native scale into an MVTec-layout folder with ONE category per grid position
  (`<class>@r<row>c<col>`); since the trainer pairs a query with a normal prompt image of its
  own class, a query tile is then paired with the same-position tile of another normal image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lineguard.runtime.calibration.positions import MIN_FRAMES, rulers_of_positions
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.tiling import (
    Grid,
    TilingConfig,
    cut,
    make_grid,
    position_arrays,
    ruled_max,
    stitch,
    to_canvas,
)
from lineguard.train.data import Sample, _imread, scan_mvtec, to_rgb_u8
from lineguard.train.metrics import class_metrics, mean_metrics
from lineguard.train.prompts import parse_prompt_spec, to_tensor, train_rows_by_class

log = logging.getLogger(__name__)


def position_class(category: str, row: int, col: int) -> str:
    """The class of one grid position's tiles: ``<class>@r<row>c<col>``."""
    return f"{category}@r{row}c{col}"


def is_tile_class(category: str) -> bool:
    """Whether ``category`` names a grid position (:func:`position_class`)."""
    return re.search(r"@r\d+c\d+$", str(category)) is not None


def load_original(path: str | Path) -> np.ndarray:
    """RGB uint8 H×W×3 at the file's own size (no resize)."""
    return to_rgb_u8(_imread(Path(path), cv2.IMREAD_UNCHANGED))


def load_original_mask(path: str | Path | None, hw: tuple[int, int]) -> np.ndarray:
    """Binary uint8 mask at `hw` (the image's size; nearest resize if the file differs)."""
    if path is None:
        return np.zeros(hw, np.uint8)
    m = _imread(Path(path), cv2.IMREAD_GRAYSCALE)
    if m.shape != hw:
        m = cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return (m > 0).astype(np.uint8)


def image_grid(hw: tuple[int, int], tile: int, tiling: TilingConfig) -> Grid:
    return make_grid(hw[1], hw[0], tile, tiling.scale, tiling.overlap)


@torch.no_grad()
def detect_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    prompt_tokens: torch.Tensor,
    grid: Grid,
    device: torch.device | str,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (original size) -> (map at the ORIGINAL size float32, raw score per tile)."""
    tiles = cut(to_canvas(image, grid), grid)
    maps, scores = [], []
    for a in range(0, len(tiles), batch_size):
        amap, score = model.detect(
            to_tensor(tiles[a : a + batch_size], device), prompt_tokens[a : a + batch_size]
        )
        maps.append(amap.float()[:, 0].cpu().numpy())
        scores.append(score.float().reshape(-1).cpu().numpy())
    tile_maps = np.concatenate(maps)
    t = grid.tile
    if tile_maps.shape[1:] != (t, t):
        raise LineGuardError(f"model map is {tile_maps.shape[1:]} but its input is {(t, t)}")
    canvas = stitch(tile_maps, grid)
    h, w = image.shape[:2]
    full = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
    return full, np.concatenate(scores).astype(np.float64)


def position_validation(ckpt: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """Held-out validation tiles per position class (`<class>@r<row>c<col>`) of a model trained
    per grid position, re-read with its recipe's split; None for any other model or when the
    training tiles cannot be read any more."""
    if not any(is_tile_class(c) for c in ckpt.get("classes") or []):
        return None
    from lineguard.train.train_config import TrainConfig
    from lineguard.train.train_data import load_training_data_for

    try:
        data = load_training_data_for(TrainConfig.model_validate(ckpt["train_config"]))
    except (LineGuardError, OSError) as exc:
        log.warning("per-position rulers: training tiles not readable (%s); plain max", exc)
        return None
    return {c: data.val_images[data.val_labels == i] for i, c in enumerate(data.classes)}


@torch.no_grad()
def validation_rulers(
    model: torch.nn.Module,
    val: Mapping[str, np.ndarray] | None,
    category: str,
    tokens: torch.Tensor,
    prompt_tiles: np.ndarray,
    grid: Grid,
    device: torch.device | str,
    batch_size: int = 32,
) -> tuple[list[dict[str, float]], str] | None:
    """Rulers of `category`'s positions on this grid, from each position's held-out validation
    tiles scored against its prompt tile (the prompt tile itself left out); None without them."""
    if not val:
        return None
    rows, cols = range(len(grid.ys)), range(len(grid.xs))
    names = [position_class(category, r, c) for r in rows for c in cols]
    if any(n not in val for n in names):
        log.warning("per-position rulers: the model was not trained on this grid; plain max")
        return None
    kept = [
        [t for t in val[n] if not np.array_equal(t, prompt_tiles[k])] for k, n in enumerate(names)
    ]
    if min(len(t) for t in kept) < MIN_FRAMES:  # too few to rule a position: the plain max
        log.warning(
            "per-position rulers need %d validation tiles per position; plain max", MIN_FRAMES
        )
        return None
    columns = []
    for k, tiles in enumerate(np.stack(t) for t in kept):
        out = []
        for a in range(0, len(tiles), batch_size):
            part = to_tensor(tiles[a : a + batch_size], device)
            _, sc = model.detect(part, tokens[k : k + 1].expand(len(part), *tokens.shape[1:]))
            out.append(sc.float().reshape(-1).cpu().numpy())
        columns.append(np.concatenate(out))
    try:
        rulers = rulers_of_positions(columns)
    except LineGuardError as exc:
        log.warning("per-position rulers: %s; plain max", exc)
        return None
    n = min(len(c) for c in columns)
    return rulers, f"ruled max: per-position rulers from >= {n} held-out validation tiles each"


@torch.no_grad()
def encode_tiles(
    model: torch.nn.Module, prompt: np.ndarray, grid: Grid, mode: str, device: torch.device | str
) -> torch.Tensor:
    """Prompt tokens per grid position (N×n×D), or the centre tile's repeated (`shared`)."""
    tiles = cut(to_canvas(prompt, grid), grid)
    if mode == "shared":
        centre = (len(grid.ys) // 2) * len(grid.xs) + len(grid.xs) // 2
        one = model.encode_prompt(to_tensor(tiles[centre : centre + 1], device))
        return one.expand(grid.n, *one.shape[1:])
    return torch.cat(
        [
            model.encode_prompt(to_tensor(tiles[a : a + 16], device))
            for a in range(0, len(tiles), 16)
        ]
    )


def original_prompts(
    classes: Sequence[str],
    samples: Sequence[Sample],
    spec: str | None = "fixed",
    checkpoint_prompts: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """One normal prompt per class at its ORIGINAL size: a named file, the checkpoint's golden
    sample when its path is one of the data's training images, else the first training image."""
    mode, arg = parse_prompt_spec(spec)
    rows = train_rows_by_class(samples)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for cls in classes:
        if mode == "file" or (mode == "named" and cls in arg):  # type: ignore[operator]
            path = Path(arg if mode == "file" else arg[cls])  # type: ignore[index]
            out[cls] = (str(path), load_original(path))
            continue
        if cls not in rows:
            raise LineGuardError(f"no training image of {cls!r} for a tiled prompt; use --prompt")
        chosen = rows[cls][0]
        if mode == "fixed" and checkpoint_prompts and cls in checkpoint_prompts:
            want = str(checkpoint_prompts[cls].get("path", ""))
            chosen = next((i for i in rows[cls] if want.endswith(samples[i].rel_path)), chosen)
        out[cls] = (samples[chosen].rel_path, load_original(samples[chosen].path))
    return out


def evaluate_tiled(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    tiling: TilingConfig,
    device: torch.device | str,
    prompt: str | None = "fixed",
    checkpoint_prompts: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    size: int | None = None,
    val: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], list[np.ndarray], np.ndarray]:
    """Tiled evaluation of the test samples: (results, maps at original size, scores); the
    tile is the model's input `size` (default `model.cfg.input_size`); `val`: held-out tiles
    per position class (:func:`position_validation`) for per-position rulers."""
    test = [s for s in samples if s.split == "test"]
    if not test:
        raise LineGuardError("no test images in the data (expected <category>/test/<defect>)")
    size = int(size or model.cfg.input_size)
    classes = sorted({s.category for s in test})
    prompts = original_prompts(classes, samples, prompt, checkpoint_prompts)
    tokens: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
    rulers: dict[tuple[str, tuple[int, int]], tuple[np.ndarray, np.ndarray] | None] = {}
    ruled: dict[str, str] = {}
    maps: list[np.ndarray] = []
    scores = np.zeros(len(test), np.float64)
    tiles = np.zeros(len(test), np.int64)
    for i, s in enumerate(tqdm(test, desc="evaluate (tiled)", unit="img", disable=not progress)):
        img = load_original(s.path)
        hw = img.shape[:2]
        grid = image_grid(hw, size, tiling)
        key = (s.category, hw)
        if key not in tokens:
            p = prompts[s.category][1]
            if p.shape[:2] != hw:  # a prompt of another size: bring it to this image's size
                p = cv2.resize(p, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
            tokens[key] = encode_tiles(model, p, grid, tiling.prompt, device)
            ptiles = cut(to_canvas(p, grid), grid)
            found = validation_rulers(model, val, s.category, tokens[key], ptiles, grid, device)
            rulers[key] = found and position_arrays(found[0])
            ruled[s.category] = found[1] if found else "max over tiles (one ruler)"
        m, tile_scores = detect_tiled(model, img, tokens[key], grid, device, batch_size)
        r = rulers[key]
        scores[i] = tile_scores.max() if r is None else ruled_max(tile_scores, *r)
        maps.append(m)
        tiles[i] = grid.n
    per_class = {}
    for cls in classes:
        idx = [i for i, s in enumerate(test) if s.category == cls]
        hw = maps[idx[0]].shape
        cm = np.stack([_fit(maps[i], hw) for i in idx])
        masks = np.stack([load_original_mask(test[i].mask_path, hw) for i in idx])
        labels = np.array([test[i].label for i in idx])
        per_class[cls] = class_metrics(labels, scores[idx], masks, cm)
    results = {
        "mean": mean_metrics(per_class),
        "per_class": per_class,
        "prompts": {c: prompts[c][0] for c in classes},
        "classes": classes,
        "test_images": len(test),
        "input_size": size,
        "tiling": tiling.model_dump(),
        "tiles_per_image": float(tiles.mean()),
        "image_score": ruled,
        "maps_at": "original image size",
    }
    return results, maps, scores


def _fit(m: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    if m.shape == hw:
        return m
    return cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)


def tile_dataset(
    roots: str | Path | Sequence[str | Path],
    out: str | Path,
    tile: int,
    tiling: TilingConfig,
    categories: Iterable[str] | None = None,
) -> dict[str, int]:
    """Cut the normal TRAINING images into `out/<class>@r<row>c<col>/train/good/<stem>.png`
    (one category per grid position; frames of a class must share one size). Returns tiles per
    category."""
    out = Path(out)
    counts: dict[str, int] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for s in scan_mvtec(roots, categories):
        if s.split != "train" or s.label != 0:
            continue
        img = load_original(s.path)
        if sizes.setdefault(s.category, img.shape[:2]) != img.shape[:2]:
            raise LineGuardError(
                f"{s.path}: {img.shape[1]}x{img.shape[0]}, other training images of "
                f"{s.category} are {sizes[s.category][1]}x{sizes[s.category][0]}; per-position "
                "categories need one frame size"
            )
        grid = image_grid(img.shape[:2], tile, tiling)
        for k, t in enumerate(cut(to_canvas(img, grid), grid)):
            r, c = divmod(k, len(grid.xs))
            cat = position_class(s.category, r, c)
            folder = out / cat / "train" / "good"
            folder.mkdir(parents=True, exist_ok=True)
            stem = s.rel_path.replace("/", "_").rsplit(".", 1)[0]
            if not cv2.imwrite(str(folder / f"{stem}.png"), cv2.cvtColor(t, cv2.COLOR_RGB2BGR)):
                raise LineGuardError(f"cannot write {folder / stem}.png")
            counts[cat] = counts.get(cat, 0) + 1
    if not counts:
        raise LineGuardError("no normal training images to tile")
    return counts
