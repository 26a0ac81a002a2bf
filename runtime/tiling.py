"""Tiling a station's ROI at the scale of the defect, and stitching the tile maps back.

Why: a square resize of a wide, high-resolution ROI (1920×1080 → 224×224) shrinks a 3-pixel
scratch below one model pixel and distorts the aspect ratio. Tiling instead resizes the ROI by a
fixed `scale` (frame pixels per model pixel; 1.0 = native), keeping the aspect ratio, and covers
that "canvas" with model-input-sized tiles that overlap. Every tile position has its own prompt
tokens (the golden sample cut with the same grid), so a query tile is compared with the very same
part of the normal product.

The stitched map lives on the canvas (ROI coordinates, one map pixel = `scale`×`scale` frame
pixels); `regions.find_regions` maps it to frame pixels like any map. Overlaps are blended with
a trapezoid window that is positive everywhere, so a constant map stitches back exactly.

Pure numpy (plus cv2 for the one resize, as the rest of the edge): no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class PositionScale(BaseModel):
    """One tile position's image-score ruler: (raw score − center) / scale."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    center: float = Field(title="Median raw image score of this tile position on normal frames")
    scale: float = Field(gt=0, title="99th percentile minus the median (raw units)")


class TilingConfig(BaseModel):
    """Station setting: run the model on overlapping tiles of the ROI instead of one resize."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        1.0,
        gt=0,
        le=64,
        title="Frame pixels per model pixel (1.0 = native resolution, 2.0 = halve the ROI)",
        description="Choose it so the smallest defect still covers a few model pixels; the "
        "tile size is the model's input size",
    )
    overlap: float = Field(
        0.25,
        ge=0,
        le=0.75,
        title="Least overlap of neighbouring tiles, as a fraction of the tile",
        description="Tiles are spread evenly, so the real overlap can be larger; overlaps are "
        "blended (a defect on a seam is seen whole by at least one tile)",
    )
    prompt: Literal["per-tile", "shared"] = Field(
        "per-tile",
        title="Prompt per tile position, or one prompt tile for every position",
        description="per-tile: the golden sample is cut with the same grid (frames must have "
        "the golden sample's size); shared: its centre tile serves every position (textures)",
    )
    max_tiles: int = Field(
        64, ge=1, le=4096, title="Most tiles per frame (a guard against a too fine scale)"
    )
    position_norm: list[PositionScale] | None = Field(
        None,
        min_length=1,
        title="Per-position image-score rulers, one per tile, row-major (written by "
        "`lineguard calibrate --positions`)",
        description="The frame's image score is the max over its tiles, so without this the "
        "position whose normal scores run highest (an edge, a thread) decides every frame. "
        "With it each tile's score is read on its own position's ruler (0 = its median on "
        "normal frames, 1 = its 99th percentile) before the max. Unset: the model's one ruler "
        "for every tile. Image thresholds are in the units of whichever ruler is in force",
    )


@dataclass(frozen=True, slots=True)
class Grid:
    """Tiles covering a canvas of `canvas_hw` model pixels; `xs`/`ys` are tile origins."""

    canvas_hw: tuple[int, int]
    tile: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    overlap_px: int

    @property
    def n(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(x, y) of every tile, row-major (the order of `cut` and of the prompt tokens)."""
        return [(x, y) for y in self.ys for x in self.xs]


def axis_starts(length: int, tile: int, overlap_px: int) -> tuple[int, ...]:
    """Evenly spread tile origins along one axis: first at 0, last ending at `length`."""
    if length <= tile:
        return (0,)
    stride = max(1, tile - overlap_px)
    n = math.ceil((length - tile) / stride) + 1
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def make_grid(roi_w: int, roi_h: int, tile: int, scale: float, overlap: float) -> Grid:
    """The grid for an ROI of `roi_w`×`roi_h` frame pixels; a canvas side never below a tile
    (an ROI smaller than a tile at this scale is stretched up to it in that direction)."""
    cw = max(tile, round(roi_w / scale))
    ch = max(tile, round(roi_h / scale))
    ov = min(tile - 1, round(overlap * tile))
    return Grid((ch, cw), tile, axis_starts(cw, tile, ov), axis_starts(ch, tile, ov), ov)


def to_canvas(crop: np.ndarray, grid: Grid) -> np.ndarray:
    """The ROI crop at the canvas size (INTER_AREA when shrinking: the training rule)."""
    ch, cw = grid.canvas_hw
    if crop.shape[:2] == (ch, cw):
        return np.ascontiguousarray(crop)
    shrink = cw <= crop.shape[1] and ch <= crop.shape[0]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(crop, (cw, ch), interpolation=interp)


def cut(canvas: np.ndarray, grid: Grid) -> np.ndarray:
    """N×T×T(×C) tiles of a canvas-sized image, row-major."""
    t = grid.tile
    return np.stack([canvas[y : y + t, x : x + t] for x, y in grid.origins])


def blend_weights(tile: int, overlap_px: int) -> np.ndarray:
    """T×T float64 trapezoid: rises over `overlap_px` from each border, flat inside, never 0."""
    d = np.minimum(np.arange(tile), np.arange(tile)[::-1]) + 0.5
    ramp = np.clip(d / max(overlap_px, 1), 1e-3, 1.0)
    return np.outer(ramp, ramp)


def stitch(tile_maps: np.ndarray, grid: Grid) -> np.ndarray:
    """Blend N×T×T tile maps into one canvas map (float64 sums, float32 result).

    A weighted mean per pixel: where tiles overlap, each pixel weighs more the farther it lies
    from its tile's border (tile borders see less context)."""
    t = grid.tile
    maps = np.asarray(tile_maps, np.float64).reshape(grid.n, t, t)
    w = blend_weights(t, grid.overlap_px)
    acc = np.zeros(grid.canvas_hw, np.float64)
    norm = np.zeros(grid.canvas_hw, np.float64)
    for m, (x, y) in zip(maps, grid.origins, strict=True):
        acc[y : y + t, x : x + t] += m * w
        norm[y : y + t, x : x + t] += w
    return (acc / norm).astype(np.float32)


def prompt_tokens(
    engine: Any, prompt_crop: np.ndarray, grid: Grid, mode: str = "per-tile"
) -> np.ndarray:
    """Tokens per tile position (N×n×D), encoded once: each position's own golden tile, or the
    centre tile's tokens repeated for every position (`mode="shared"`)."""
    tiles = cut(to_canvas(prompt_crop, grid), grid)
    if mode == "shared":
        centre = tiles[(len(grid.ys) // 2) * len(grid.xs) + len(grid.xs) // 2]
        one = np.asarray(engine.encode_prompt(np.ascontiguousarray(centre)), np.float32)
        return np.repeat(one.reshape(1, *one.shape[-2:]), grid.n, axis=0)
    toks = [np.asarray(engine.encode_prompt(np.ascontiguousarray(t)), np.float32) for t in tiles]
    return np.stack([t.reshape(t.shape[-2:]) for t in toks])


def detect_tiles(
    engine: Any, tiles: np.ndarray, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All tiles of a frame in one batched call where the engine can (`detect_batch`), else one
    call per tile: (raw maps N×T×T float32, raw scores N float64)."""
    batch = getattr(engine, "detect_batch", None)
    if batch is not None:
        maps, scores = batch(tiles, tokens)
    else:
        outs = [
            engine.detect(np.ascontiguousarray(t), tokens[i : i + 1]) for i, t in enumerate(tiles)
        ]
        maps = np.stack([np.asarray(m, np.float32).reshape(m.shape[-2:]) for m, _ in outs])
        scores = np.array([float(s) for _, s in outs])
    maps = np.asarray(maps, np.float32).reshape(len(tiles), *np.shape(maps)[-2:])
    t = tiles.shape[1]
    if maps.shape[1:] != (t, t):
        maps = np.stack([cv2.resize(m, (t, t), interpolation=cv2.INTER_LINEAR) for m in maps])
    return maps, np.asarray(scores, np.float64).reshape(-1)


def position_arrays(norm: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(centers, scales) float64 arrays of per-position rulers given as `{center, scale}`."""
    return (
        np.array([p["center"] for p in norm], np.float64),
        np.array([p["scale"] for p in norm], np.float64),
    )


def ruled_max(scores: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> float:
    """Max over tiles of each tile's raw score on its own position's ruler."""
    if len(scores) != len(centers):
        raise ValueError(
            f"tiling.position_norm holds {len(centers)} positions but this frame has "
            f"{len(scores)} tiles; re-run `lineguard calibrate --positions` for this grid"
        )
    return float(((np.asarray(scores, np.float64) - centers) / scales).max())


def tile_counts(
    sizes: Sequence[tuple[int, int]], tile: int, scale: float, overlap: float
) -> list[int]:
    """Tiles per image for (width, height) sizes (reports, benchmarks)."""
    return [make_grid(w, h, tile, scale, overlap).n for w, h in sizes]
