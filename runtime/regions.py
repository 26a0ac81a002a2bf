"""Geometry between the camera frame and the model input, and defect regions from a score map.

Station configs give the ROI and ignore masks as fractions of the frame (they survive a camera
resolution change); the model sees the ROI crop resized to its input size. Everything an operator
reads (region boxes, areas) is reported back in frame pixels, everything the model-side rules use
(minimum area, masks applied to the map) is in model-input pixels.

Coordinate convention: a frame pixel (x, y) covers [x, x+1) × [y, y+1); a model-input pixel
(u, v) covers the frame area [rx + u·sx, rx + (u+1)·sx) × [ry + v·sy, ry + (v+1)·sy) with
sx = roi_w / input_w and sy = roi_h / input_h.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, w, h in frame pixels


def roi_pixels(roi: Sequence[float] | None, width: int, height: int) -> Box:
    """ROI fractions [x, y, w, h] → an integer pixel box inside the frame, at least 1×1."""
    if roi is None:
        return 0, 0, width, height
    fx, fy, fw, fh = (float(v) for v in roi)
    x0 = min(max(round(fx * width), 0), width - 1)
    y0 = min(max(round(fy * height), 0), height - 1)
    x1 = min(max(round((fx + fw) * width), x0 + 1), width)
    y1 = min(max(round((fy + fh) * height), y0 + 1), height)
    return x0, y0, x1 - x0, y1 - y0


def polygons_to_pixels(
    polygons: Sequence[Sequence[Sequence[float]]], width: int, height: int
) -> list[np.ndarray]:
    """Polygons as frame fractions → float arrays of frame coordinates (N×2, x then y)."""
    return [np.asarray(p, np.float64).reshape(-1, 2) * (width, height) for p in polygons]


def ignore_mask(
    polygons_px: Sequence[np.ndarray], roi: Box, input_hw: tuple[int, int]
) -> np.ndarray | None:
    """Boolean mask at model-input size, True where a map pixel's centre lies inside any ignore
    polygon (even-odd rule), the centre taken in frame coordinates. None when there are no masks.

    An exact centre test rather than cv2.fillPoly, whose rasteriser also takes pixels the outline
    merely touches; computed once per frame size, so vectorised numpy is fast enough.
    """
    if not polygons_px:
        return None
    rx, ry, rw, rh = roi
    h, w = input_hw
    xs = rx + (np.arange(w) + 0.5) * (rw / w)
    ys = ry + (np.arange(h) + 0.5) * (rh / h)
    px, py = np.meshgrid(xs, ys)
    mask = np.zeros((h, w), bool)
    for poly in polygons_px:
        inside = np.zeros((h, w), bool)
        for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
            if y1 == y2:
                continue  # a horizontal edge never crosses a horizontal ray
            crosses = (y1 > py) != (y2 > py)
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
            inside ^= crosses & (px < x_at)
        mask |= inside
    return mask


@dataclass(frozen=True, slots=True)
class Region:
    """One connected defect region: box and area in frame pixels, scores in normalised units."""

    bbox: Box
    area_px: float
    max_score: float
    mean_score: float
    area_input_px: int

    def to_dict(self) -> dict:
        return {
            "bbox": list(self.bbox),
            "area_px": round(self.area_px, 2),
            "max_score": round(self.max_score, 5),
            "mean_score": round(self.mean_score, 5),
        }


def find_regions(
    score_map: np.ndarray,
    pixel_threshold: float,
    min_area_px: int,
    roi: Box,
    frame_size: tuple[int, int],
    ignore: np.ndarray | None = None,
    *,
    keep: np.ndarray | None = None,
) -> list[Region]:
    """8-connected regions of `score_map >= pixel_threshold` (ignored pixels excluded) with at
    least `min_area_px` model-input pixels, largest max score first, boxes in frame pixels.

    `score_map` is the normalised map at model-input size; `frame_size` is (width, height).
    `keep` is the precomputed complement of `ignore` (the pipeline's per-station geometry), so
    the per-frame path does not negate the mask again; give one or the other.
    """
    binary = np.greater_equal(score_map, pixel_threshold)
    if keep is None and ignore is not None:
        keep = ~ignore
    if keep is not None:
        np.logical_and(binary, keep, out=binary)
    if not binary.any():
        return []
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    h, w = score_map.shape
    rx, ry, rw, rh = roi
    sx, sy = rw / w, rh / h
    fw, fh = frame_size
    regions = []
    big = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area_px) + 1  # vectorised filter
    for label in big.tolist():
        x, y, bw, bh, area = (int(v) for v in stats[label])
        values = score_map[y : y + bh, x : x + bw][labels[y : y + bh, x : x + bw] == label]
        x0 = max(0, math.floor(rx + x * sx + 1e-9))
        y0 = max(0, math.floor(ry + y * sy + 1e-9))
        x1 = min(fw, math.ceil(rx + (x + bw) * sx - 1e-9))
        y1 = min(fh, math.ceil(ry + (y + bh) * sy - 1e-9))
        regions.append(
            Region(
                bbox=(x0, y0, max(1, x1 - x0), max(1, y1 - y0)),
                area_px=float(area * sx * sy),
                max_score=float(values.max()),
                mean_score=float(values.mean()),
                area_input_px=area,
            )
        )
    regions.sort(key=lambda r: r.max_score, reverse=True)
    return regions
