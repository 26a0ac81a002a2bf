"""Image thresholds for several stations from their pooled HELD-OUT normal frames.

Why: a model scores the images it was trained on optimistically low, most of all in the upper
tail a threshold comes from, so a threshold fitted on training images (train/good) alerts more
often on new parts than promised. The images the training run held out (its validation split)
are unbiased but few per class (8 on piped: too few for any bound). So the held-out frames of
all groups (stations, or classes of one model) are pooled in units of each group's own scale,
and training images only provide that scale:

* **Ruler.** Group g's training-image scores give c_g = median and s_g = mean absolute deviation
  from it; a score x of that group is z = (x − c_g)/s_g. A ruler needs no unbiased images: a
  shifted or widened ruler is applied alike to the held-out frames and, later, to the threshold.
  Its noise does reach each group's threshold, so the most stable scale was taken: from 23
  Gumbel or lognormal scores its coefficient of variation is 0.19–0.38, against 0.32–0.49 for
  q90 − median and 0.21–0.59 for the standard deviation (`calibration_rules.py`, `ruler`).
* **Pool.** The held-out z of all groups form one sample; `fit.propose_threshold` gives its
  upper confidence bound z_T, and group g's threshold is c_g + s_g·z_T. The bound holds for the
  groups' mix (the mean false-alarm rate over stations) if new frames of every group, on its
  ruler, follow the pooled distribution; a group with a heavier standardised tail than the pool
  gets more than α, one with a lighter tail less. Below the distribution-free size z_T is never
  below the largest pooled z, so no group's own held-out frames would alert.
* With one group this is the rule on its held-out scores alone (the rule is affine-equivariant).

Correcting the training scores instead (shift and scale them so their median and 90th
percentile match the held-out ones, then calibrate on both) was simulated and not taken
(`benchmarks/calibration_rules.py`): without a margin for the correction's own uncertainty its
mean false-alarm rate exceeded the target (1.1–1.2 % for 1 %) at mtd sizes whenever training
squeezes the upper tail more than a shift and scale describe; with one (δ split between the
sampling and the correction) it kept the target but its thresholds reached 2.0–3.2× the true
quantile at piped sizes (pooling: 1.6–2.0×), saving 5–20 % only at mtd sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from lineguard.runtime.calibration.fit import ThresholdProposal, propose_threshold

MIN_TRAINED = 5  # training-image scores a group needs for its ruler


@dataclass(frozen=True)
class Ruler:
    """A group's scale from its training-image scores: z = (x − center) / spread."""

    center: float
    spread: float

    def to_z(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.center) / self.spread

    def from_z(self, z: float) -> float:
        return float(self.center + self.spread * z)


def ruler(trained: np.ndarray) -> Ruler:
    """Median of training-image scores and their mean absolute deviation from it."""
    t = np.asarray(trained, np.float64).ravel()
    if t.size < MIN_TRAINED:
        raise ValueError(f"a ruler needs {MIN_TRAINED}+ training-image scores, got {t.size}")
    if not np.all(np.isfinite(t)):
        raise ValueError("training-image scores contain NaN or infinity")
    center = float(np.median(t))
    spread = float(np.mean(np.abs(t - center)))
    if spread <= 1e-12 * max(1.0, abs(center)):
        raise ValueError("training-image scores are all equal: no scale to pool with")
    return Ruler(center, spread)


@dataclass
class PooledProposal:
    """The pooled bound in ruler units and what it means for each group."""

    z: ThresholdProposal  # the rule on the pooled held-out z
    rulers: dict[str, Ruler]
    held_out: dict[str, int]

    def for_group(self, name: str) -> ThresholdProposal:
        """Group `name`'s proposal in its own score units (the pooled one through its ruler)."""
        r, z = self.rulers[name], self.z

        def back(v: float | None) -> float | None:
            return None if v is None else r.from_z(v)

        return replace(
            z,
            threshold=r.from_z(z.threshold),
            estimate=r.from_z(z.estimate),
            margin=z.margin * r.spread,
            order_statistic_ucb=back(z.order_statistic_ucb),
            tail_ucb=back(z.tail_ucb),
            sample_max=r.from_z(z.sample_max),
            tail=None if z.tail is None else {**z.tail, "units": "pooled z"},
            warnings=list(z.warnings),
            pooled=self.summary(name),
        )

    def summary(self, name: str | None = None) -> dict:
        out = {
            "groups": len(self.rulers),
            "held_out": sum(self.held_out.values()),
            "z_threshold": self.z.threshold,
            "ruler": "median and mean absolute deviation of training-image scores",
        }
        if name is not None:
            out |= {"group": name, "group_ruler": asdict(self.rulers[name])}
            out["group_held_out"] = self.held_out[name]
        return out


def propose_pooled(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]],
    target_rate: float,
    confidence: float = 0.95,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> PooledProposal:
    """Pooled proposal from `{group: (held-out scores, training-image scores)}` (see the module
    docstring); a group without held-out scores still gets a threshold through its ruler."""
    if not groups:
        raise ValueError("no groups to pool")
    rulers = {name: ruler(trained) for name, (_, trained) in groups.items()}
    z_parts, held_out = [], {}
    for name, (held, _) in groups.items():
        h = np.asarray(held, np.float64).ravel()
        if not np.all(np.isfinite(h)):
            raise ValueError(f"{name}: held-out scores contain NaN or infinity")
        z_parts.append(rulers[name].to_z(h))
        held_out[name] = int(h.size)
    z = propose_threshold(
        np.concatenate(z_parts), target_rate, confidence, n_boot=n_boot, seed=seed
    )
    return PooledProposal(z, rulers, held_out)
