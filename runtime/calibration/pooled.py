"""Image thresholds for stations with too few unseen normal frames of their own (numpy only).

A station's own tail fit (`fit.py`) needs at least `MIN_SCORES` normal frames the model never
trained on. Frames it trained on score lower than new parts of the same kind (it has learned
them), so a threshold fitted on them alarms too often on the line. When a model serves several
stations (one per class) and each has only a few unseen frames, the stations are calibrated
together:

* each station's *ruler* comes from its frames the model trained on (plentiful): center = their
  median, spread = their 90th percentile − median; it fixes the station's units only;
* every station's unseen frames are read on their own ruler, z = (score − center) / spread, and
  pooled; the pooled z are the normal sample for `propose_threshold` (tail fit, confidence
  bound), giving one threshold z* in ruler units;
* each station's image threshold is center + z*·spread.

The assumption, stated in every proposal: after the ruler, the unseen normal scores of the
stations share one distribution (the same model overfits each class's training frames alike).
It replaces the seen-frame fit, whose false-alarm rate nothing bounds, by a bound on unseen
frames; with 20+ unseen frames of its own a station is calibrated alone. The bound holds for the
stations on average, not each one: in simulation (12 stations, 25 seen and 8 unseen Gumbel-tailed
scores each, target 1 %, 40 draws) the stations' mean false-alarm rate on fresh parts stayed
≤ 1 % in 85 % of draws and ≤ 2 % in 97.5 %, while a single station reached 16 % in the worst
draw (its ruler rests on 25 frames); the seen-frame fits averaged 17–38 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from lineguard.runtime.calibration.fit import MIN_SCORES, ThresholdProposal, propose_threshold

RULER_QUANTILE = 0.9  # the spread's upper point: stable on ~20 frames, unlike a max or p99

POOLED_NOTE = (
    "pooled: the station has fewer than {n_min} unseen normal frames; its threshold is the "
    "bound of the unseen frames of {stations} stations ({frames} frames) read on each station's "
    "ruler from its training frames (median, p90 − median), assuming the stations' unseen scores "
    "share one distribution on those rulers"
)


@dataclass(frozen=True)
class Ruler:
    """A station's units: z = (score − center) / spread."""

    center: float
    spread: float

    def to_z(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, np.float64) - self.center) / self.spread

    def from_z(self, z: float) -> float:
        return float(self.center + z * self.spread)


def make_ruler(seen: np.ndarray) -> Ruler:
    """Ruler from a station's frames the model trained on (finite scores, at least 2)."""
    x = np.asarray(seen, np.float64).ravel()
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError("a ruler needs at least 2 finite scores of frames seen in training")
    center = float(np.median(x))
    spread = float(np.quantile(x, RULER_QUANTILE) - center)
    floor = 1e-6 * max(1.0, abs(center), float(np.ptp(x)))
    return Ruler(center, max(spread, floor))


@dataclass
class PooledProposal:
    """Per station the threshold, and the pooled fit in ruler units behind all of them."""

    thresholds: dict[str, float]
    rulers: dict[str, Ruler]
    z: ThresholdProposal
    frames: dict[str, int]
    note: str

    def to_dict(self) -> dict:
        return {
            "thresholds": self.thresholds,
            "rulers": {k: asdict(v) for k, v in self.rulers.items()},
            "z": self.z.to_dict(),
            "frames": self.frames,
            "note": self.note,
        }


def propose_pooled(
    seen: Mapping[str, np.ndarray],
    unseen: Mapping[str, np.ndarray],
    target_rate: float,
    confidence: float = 0.95,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> PooledProposal:
    """Thresholds for the stations of `unseen` (see the module docstring); `seen` must hold
    every one of them. Raises ValueError when the pooled unseen frames are too few to fit."""
    missing = sorted(set(unseen) - set(seen))
    if missing:
        raise ValueError(f"no training-frame scores for stations {missing}")
    rulers = {s: make_ruler(seen[s]) for s in unseen}
    frames = {s: int(np.asarray(unseen[s]).size) for s in unseen}
    pooled = np.concatenate(
        [rulers[s].to_z(np.asarray(unseen[s]).ravel()) for s in unseen] or [np.zeros(0)]
    )
    if pooled.size < MIN_SCORES:
        raise ValueError(
            f"{pooled.size} unseen normal frames over {len(unseen)} stations: a pooled fit needs "
            f"at least {MIN_SCORES}"
        )
    z = propose_threshold(pooled, target_rate, confidence, n_boot=n_boot, seed=seed)
    note = POOLED_NOTE.format(n_min=MIN_SCORES, stations=len(unseen), frames=pooled.size)
    thresholds = {s: rulers[s].from_z(z.threshold) for s in unseen}
    return PooledProposal(thresholds, rulers, z, frames, note)
