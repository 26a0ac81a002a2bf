"""Pixel threshold for region extraction, from NORMAL pixel scores (numpy only).

The pixel threshold is the (1 − `pixel_rate`) quantile of the pooled normal pixel scores (pixels
inside the ROI and outside the ignore masks), with a margin from a bootstrap over frames (pixels
of one frame are correlated, frames are the independent unit). Only each frame's largest pixel
scores are kept (`PixelTail`), enough for that quantile.

It shapes the regions of an alert, not the false-alarm rate: a frame alerts only if its image
score reaches the image threshold (`fit.py`), so that bound holds whatever the pixel threshold.
"""

from __future__ import annotations

import math

import numpy as np


class PixelTail:
    """The largest normal pixel scores of each frame, enough for a high pooled quantile.

    A frame keeps its `keep_fraction` largest valid pixels (at least `min_keep`); the pooled
    (1 − rate) quantile is exact as long as no frame has more pixels above it than it kept
    (checked; a warning otherwise).
    """

    def __init__(self, keep_fraction: float = 0.05, min_keep: int = 256) -> None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError("keep_fraction must be in (0, 1]")
        self.keep_fraction = keep_fraction
        self.min_keep = min_keep
        self.values: list[np.ndarray] = []  # per frame, descending
        self.valid: list[int] = []

    def add(self, score_map: np.ndarray, valid: np.ndarray | None = None) -> None:
        v = np.asarray(score_map, np.float32)
        v = v[valid] if valid is not None else v.ravel()
        m = min(v.size, max(self.min_keep, math.ceil(v.size * self.keep_fraction)))
        top = np.partition(v, v.size - m)[v.size - m :] if m < v.size else v
        self.values.append(np.sort(top)[::-1].astype(np.float32))
        self.valid.append(int(v.size))

    @property
    def frames(self) -> int:
        return len(self.values)


def _pooled_quantile(
    values: np.ndarray, frame_of: np.ndarray, weights: np.ndarray, valid: np.ndarray, rate: float
) -> float:
    """Value v with (weighted) count of pooled pixels ≥ v reaching rate·total (values desc)."""
    need = rate * float(np.dot(weights, valid))
    counts = np.cumsum(weights[frame_of])
    i = int(np.searchsorted(counts, need, side="left"))
    return float(values[min(i, values.size - 1)])


def propose_pixel_threshold(
    tail: PixelTail,
    rate: float,
    confidence: float = 0.95,
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """Pixel threshold exceeded by a fraction `rate` of normal pixels, with a frame-bootstrap
    upper confidence bound (frames are the independent unit). Returns a report dict."""
    if tail.frames == 0:
        raise ValueError("no frames")
    if not 0.0 < rate < tail.keep_fraction:
        raise ValueError(f"pixel rate must be in (0, {tail.keep_fraction}) for the kept pixels")
    lengths = np.array([v.size for v in tail.values])
    values = np.concatenate(tail.values)
    frame_of = np.repeat(np.arange(tail.frames), lengths)
    order = np.argsort(-values, kind="stable")
    values, frame_of = values[order], frame_of[order]
    valid = np.asarray(tail.valid, np.float64)
    ones = np.ones(tail.frames)
    estimate = _pooled_quantile(values, frame_of, ones, valid, rate)
    rng = np.random.default_rng(seed)
    boots = np.array(
        [
            _pooled_quantile(
                values,
                frame_of,
                np.bincount(rng.integers(0, tail.frames, tail.frames), minlength=tail.frames),
                valid,
                rate,
            )
            for _ in range(n_boot)
        ]
    )
    threshold = max(float(np.quantile(boots, confidence)), estimate)
    above = np.array([int(np.sum(v >= estimate)) for v in tail.values])
    saturated = int(np.sum(above >= lengths))
    warnings = []
    if saturated:
        warnings.append(
            f"{saturated} frame(s) had more high pixels than were kept: the pixel estimate is a "
            "lower bound (raise the keep fraction)"
        )
    return {
        "threshold": threshold,
        "estimate": estimate,
        "margin": threshold - estimate,
        "rate": rate,
        "confidence": confidence,
        "frames": tail.frames,
        "pixels": int(valid.sum()),
        "method": "pooled normal-pixel quantile, frame bootstrap upper bound",
        "frames_with_pixels_above": int(np.sum(above > 0)),
        "warnings": warnings,
    }
