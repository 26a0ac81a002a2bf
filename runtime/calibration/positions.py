"""Per-position image-score rulers for a tiled station, fitted on its NORMAL frames.

A tiled frame's image score is the max over its tiles. Tile positions differ in how high their
normal scores run (a thread, an edge or a reflection scores above a plain surface), so without a
ruler per position the noisiest position sets every frame's score and the image threshold has to
sit above it: a defect on a quiet position then goes unseen. `lineguard calibrate --positions`
measures each position on the station's normal frames with the rule the artifact uses for its
one ruler (median; 99th percentile minus median) and the image thresholds are then proposed on
the ruled scores, so both are written to the station file together.

On ball-screw frames (1130×460, 18 tiles) the ruled max lifted the image AUROC of the same tiled
model from 0.896 to 0.938 (benchmarks/results/tiling_bsdata_extra/tiling_bsdata_15m_rulers.json).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.tiling import position_arrays, ruled_max

MIN_FRAMES = 20  # fewer normal frames give a 99th percentile that is just the maximum of few


def fit_rulers(tile_scores: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """One `{center, scale}` per tile position from F frames' raw tile scores (F×N)."""
    if not tile_scores:
        raise LineGuardError("--positions: no tile scores (is the station tiled?)")
    counts = sorted({len(t) for t in tile_scores})
    if len(counts) != 1:
        raise LineGuardError(
            f"--positions: frames give {counts} tiles; calibrate positions on frames of one size"
        )
    a = np.stack([np.asarray(t, np.float64) for t in tile_scores])
    return rulers_of_positions(list(a.T))


def rulers_of_positions(columns: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """One `{center, scale}` per position from each position's own normal raw scores: the
    median, and the 99th percentile minus the median (the artifact's rule for its one ruler)."""
    if any(len(c) < MIN_FRAMES for c in columns):
        raise LineGuardError(
            f"per-position rulers need at least {MIN_FRAMES} normal scores per position, got "
            f"{min(len(c) for c in columns)}"
        )
    cols = [np.asarray(c, np.float64) for c in columns]
    if not all(np.isfinite(c).all() for c in cols):
        raise LineGuardError("per-position rulers: the model gave non-finite tile scores")
    center = np.array([np.median(c) for c in cols])
    scale = np.array([np.percentile(c, 99) for c in cols]) - center
    ok = scale > 1e-12
    # a position whose normal scores never vary gets the typical spread, not a hair trigger
    fallback = float(np.median(scale[ok])) if ok.any() else 1.0
    scale = np.where(ok, scale, fallback)
    return [{"center": float(c), "scale": float(s)} for c, s in zip(center, scale, strict=True)]


def ruled_scores(
    tile_scores: Sequence[np.ndarray], rulers: Sequence[dict[str, float]]
) -> list[float]:
    """Each frame's image score on the per-position rulers (the runtime's rule)."""
    c, s = position_arrays(rulers)
    try:
        return [ruled_max(t, c, s) for t in tile_scores]
    except ValueError as exc:
        raise LineGuardError(f"--positions: {exc}") from None
