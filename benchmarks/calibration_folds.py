"""`benchmarks/calibration.py --station-frames`: two folds over each station's test/good.

As a station calibrates after installation on frames its own camera captured, each class's
test/good images are split at random (seeded per class) into two halves; thresholds are fitted
on one half and the false-alarm rate is measured on the other, then the halves swap and the two
folds are averaged. Halves with fewer than :data:`MIN_SCORES` frames are calibrated with the
pooled rule (`runtime/calibration/pooled.py`), which the held-out mode uses too.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MIN_SCORES = 20  # the tail fit's minimum (runtime/calibration/fit.py); fewer: pooled


def _halves(root: Path, cls: str, seed: int, tmp: Path) -> list[Path]:
    """A class's test/good split at random into two halves (seeded per class), each a folder of
    links under `tmp`, as two batches of frames a station's camera would capture."""
    good = sorted(p for p in (root / cls / "test" / "good").iterdir() if p.is_file())
    if len(good) < 2:
        raise SystemExit(f"{cls}: --station-frames needs at least 2 test/good images")
    order = np.random.default_rng([seed, zlib.crc32(cls.encode())]).permutation(len(good))
    folders = []
    for half, idx in enumerate((order[: len(good) // 2], order[len(good) // 2 :])):
        folder = tmp / cls / f"half{half}"
        folder.mkdir(parents=True)
        for i in idx:
            (folder / good[i].name).symlink_to(good[i].absolute())
        folders.append(folder)
    return folders


def pool_proposal(cals: dict[str, dict], args: argparse.Namespace) -> Any:
    """The pooled proposal for the stations whose calibration frames are too few on their own."""
    from lineguard.runtime.calibration.pooled import propose_pooled

    pool = {c: v for c, v in cals.items() if "unseen" in v}
    if not pool:
        return None
    try:
        return propose_pooled(
            {c: v["seen"] for c, v in pool.items()},
            {c: v["unseen"] for c, v in pool.items()},
            args.target_far,
            args.confidence,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"pooled calibration of {sorted(pool)}: {e}") from None


def station_folds(
    scorers: dict[str, Any],
    bad: dict[str, Any],
    root: Path,
    args: argparse.Namespace,
    judge: Callable[..., dict[str, Any]],
) -> tuple[dict[str, Any], list[Any]]:
    """`--station-frames`: fit on one half of each station's test/good, judge the other half
    with ``judge`` (`calibration.evaluate_class`), swap, average. Returns per-station results
    and the pooled proposal of each fold (None where no station was pooled)."""
    from lineguard.runtime.calibration.scoring import folder_frames

    halves, seen = {}, {}
    for cls, scorer in scorers.items():
        halves[cls] = [
            scorer.score_all(folder_frames(d), True, f"{cls} station frames, half {h}")
            for h, d in enumerate(_halves(root, cls, args.seed, args.tmp))
        ]
        if min(len(h) for h in halves[cls]) < MIN_SCORES:  # pooled, as --held-out pools
            seen[cls] = scorer.score_all(
                folder_frames(root / cls / "train" / "good"), True, f"{cls} train/good (rulers)"
            )
    folds: dict[str, list[dict[str, Any]]] = {cls: [] for cls in scorers}
    pooled_per_fold = []
    for fit in (0, 1):
        cals = {}
        for cls in scorers:
            frames = halves[cls][fit]
            cals[cls] = {"normal": frames, "from": f"station frames: half {fit} of test/good"}
            if len(frames) < MIN_SCORES:  # pixel threshold and ruler from train/good
                cals[cls] = {
                    "normal": seen[cls],
                    "from": f"pooled: station frames (half {fit} of test/good) of all pooled "
                    "stations, each on its ruler from train/good seen in training",
                    "seen": seen[cls].arrays()[0],
                    "unseen": frames.arrays()[0],
                }
        pooled = pool_proposal(cals, args)
        pooled_per_fold.append(pooled)
        for cls, scorer in scorers.items():
            r = judge(scorer, cls, cals[cls], pooled, halves[cls][1 - fit], bad[cls], args)
            folds[cls].append({**r, "calibration_frame_names": halves[cls][fit].names})
    return {cls: _fold_mean(rs) for cls, rs in folds.items()}, pooled_per_fold


def _fold_mean(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """One station's two folds: rates averaged, each fold kept whole under `folds`."""

    def avg(get: Any) -> float | None:
        vals = [get(f) for f in folds if get(f) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "test_fpr": avg(lambda f: f["test_fpr"]),
        "test_recall": avg(lambda f: f["test_recall"]),
        "image_only": {
            k: avg(lambda f, k=k: f["image_only"][k]) for k in ("test_fpr", "test_recall")
        },
        "image_threshold": [f["image_threshold"] for f in folds],
        "pixel_threshold": [f["pixel_threshold"] for f in folds],
        "method": folds[0]["method"],
        "calibration_frames": [f["calibration_frames"] for f in folds],
        "calibration_frames_from": "station frames: half of test/good, two folds",
        "test_good": sum(f["test_good"] for f in folds),
        "test_defective": folds[0]["test_defective"],
        "folds": folds,
    }
