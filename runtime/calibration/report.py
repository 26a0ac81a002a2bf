"""Calibration report: proposal + metrics as JSON, and the PNG histogram (`histogram.py`).

`make_report` turns the scores of normal (and optionally defective) frames into a proposal and
everything an engineer needs to trust it before committing: the method, the estimate and margin,
the in-sample false-alarm rate at the old and new thresholds, and with defect images recall,
precision and F1 at the proposed and at the F1-optimal image threshold. All rates are at the
DECISION level of the pipeline (image score ≥ T and, unless the pipeline alerts on the image
score alone, a region at the pixel threshold), i.e. what the station would actually alert on.

Thresholds are rounded UP to `ROUND` decimals so the written value is never below the bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.runtime.calibration.fit import propose_threshold
from lineguard.runtime.calibration.histogram import render_histogram
from lineguard.runtime.calibration.pixel import propose_pixel_threshold
from lineguard.runtime.calibration.scoring import ScoreSet
from lineguard.runtime.events import iso

REPORT_FORMAT = "lineguard-calibration/1"
ROUND = 4

IMAGE_METHOD = (
    "Image threshold from normal image scores only: peaks-over-threshold GPD tail fit "
    "(probability-weighted moments) on the top k scores gives the estimate of the score a "
    "normal frame exceeds with probability target_far; the proposal is an upper confidence "
    "bound at `confidence`: the distribution-free order-statistic (binomial) bound when there "
    "are enough frames, else the larger of the resampling and parametric bootstrap bounds of "
    "the tail estimate. Assumes independent frames (distinct parts)."
)
PIXEL_METHOD = (
    "Pixel threshold: the score exceeded by a fraction pixel_rate of normal pixels (inside the "
    "ROI, outside ignore masks), pooled over frames, with a frame-bootstrap upper bound."
)


def round_up(value: float, decimals: int = ROUND) -> float:
    f = 10.0**decimals
    return math.ceil(value * f - 1e-9) / f


def _finite(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 6) if np.isfinite(v) else None for v in values]


def classification_at(normal: np.ndarray, defect: np.ndarray, threshold: float) -> dict:
    """Recall, precision, F1 and false-positive rate of `score ≥ threshold` (defect = positive).

    Scores of frames that can never alert (no region) are -inf and count as negatives.
    """
    normal, defect = np.asarray(normal, np.float64), np.asarray(defect, np.float64)
    tp = int(np.sum(defect >= threshold))
    fp = int(np.sum(normal >= threshold))
    fn = int(defect.size - tp)
    recall = tp / defect.size if defect.size else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "threshold": float(threshold),
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "fpr": fp / normal.size if normal.size else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": int(normal.size - fp),
    }


def f1_optimal(normal: np.ndarray, defect: np.ndarray) -> dict:
    """The threshold (one of the finite scores) with the best F1; ties go to the higher one."""
    scores = np.concatenate([np.asarray(normal, np.float64), np.asarray(defect, np.float64)])
    candidates = np.unique(scores[np.isfinite(scores)])
    if candidates.size == 0:
        return classification_at(normal, defect, math.inf)
    best = max(
        (classification_at(normal, defect, t) for t in candidates),
        key=lambda m: (m["f1"], m["threshold"]),
    )
    return best


def _metrics(normal: ScoreSet, defects: ScoreSet | None, t: dict, require_region: bool) -> dict:
    n_dec = normal.decision_scores(t["pixel"], require_region)
    out: dict[str, Any] = {
        "thresholds": t,
        "normal_alarm_rate": float(np.mean(n_dec >= t["image"])) if len(normal) else 0.0,
        "normal_image_rate": float(np.mean(normal.arrays()[0] >= t["image"])),
    }
    if defects is not None and len(defects):
        d_dec = defects.decision_scores(t["pixel"], require_region)
        out.update(classification_at(n_dec, d_dec, t["image"]))
    return out


def make_report(
    *,
    station: dict[str, Any],
    normal: ScoreSet,
    defects: ScoreSet | None,
    old: dict[str, Any],
    target_far: float,
    confidence: float,
    pixel_rate: float,
    require_region: bool = True,
    source: dict[str, Any] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the thresholds on `normal` and evaluate them (see the module docstring)."""
    image_scores, _ = normal.arrays()
    image = propose_threshold(image_scores, target_far, confidence, n_boot=n_boot, seed=seed)
    if normal.pixels is None:
        raise ValueError("normal scores were collected without pixel scores")
    pixel = propose_pixel_threshold(normal.pixels, pixel_rate, confidence, seed=seed)
    proposed = {
        "image": round_up(image.threshold),
        "pixel": round_up(pixel["threshold"]),
        "min_area_px": int(old["min_area_px"]),
    }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created": iso(),
        "station": station,
        "source": source or {},
        "target_far": target_far,
        "confidence": confidence,
        "pixel_rate": pixel_rate,
        "require_region": require_region,
        "method": {"image": IMAGE_METHOD, "pixel": PIXEL_METHOD},
        "old": dict(old),
        "proposed": proposed,
        "image": image.to_dict(),
        "pixel": pixel,
        "normal": {
            "frames": len(normal),
            "image_score": _summary(image_scores),
            "at_old": _metrics(normal, None, old, require_region),
            "at_proposed": _metrics(normal, None, proposed, require_region),
        },
        "defects": None,
        "warnings": [*image.warnings, *pixel["warnings"]],
        "scores": {
            "normal": {"names": normal.names, "image": _finite(image_scores)},
        },
    }
    report["scores"]["normal"]["region"] = _finite(normal.arrays()[1])
    if defects is not None and len(defects):
        d_image, d_region = defects.arrays()
        n_dec = normal.decision_scores(proposed["pixel"], require_region)
        d_dec = defects.decision_scores(proposed["pixel"], require_region)
        best = f1_optimal(n_dec, d_dec)
        report["defects"] = {
            "frames": len(defects),
            "image_score": _summary(d_image),
            "negatives": "the normal calibration frames (in-sample for the proposal)",
            "at_old": _metrics(normal, defects, old, require_region),
            "at_proposed": _metrics(normal, defects, proposed, require_region),
            "at_f1_optimal": {**best, "pixel": proposed["pixel"]},
        }
        report["scores"]["defects"] = {
            "names": defects.names,
            "image": _finite(d_image),
            "region": _finite(d_region),
        }
    return report


def _summary(x: np.ndarray) -> dict[str, float | None]:
    if x.size == 0:
        return {"min": None, "median": None, "p99": None, "max": None}
    q = np.quantile(x, [0.0, 0.5, 0.99, 1.0])
    return dict(zip(("min", "median", "p99", "max"), (float(v) for v in q), strict=True))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few human lines for the terminal."""
    img, pix, prop, old = report["image"], report["pixel"], report["proposed"], report["old"]
    lines = [
        f"station {report['station'].get('line')}/{report['station'].get('id')}: "
        f"{report['normal']['frames']} normal frames, target false-alarm rate "
        f"{report['target_far']:g} at {report['confidence']:.0%} confidence",
        f"  image threshold {old['image']:.4g} -> {prop['image']:.4g} "
        f"(estimate {img['estimate']:.4g}, margin {img['margin']:.3g}, {img['method']})",
        f"  pixel threshold {old['pixel']:.4g} -> {prop['pixel']:.4g} "
        f"(estimate {pix['estimate']:.4g}, pixel rate {pix['rate']:g})",
        f"  normal frames alarming: old {report['normal']['at_old']['normal_alarm_rate']:.2%}, "
        f"proposed {report['normal']['at_proposed']['normal_alarm_rate']:.2%}",
    ]
    d = report.get("defects")
    if d:
        p, b = d["at_proposed"], d["at_f1_optimal"]
        lines.append(
            f"  {d['frames']} defect images: at proposed recall {p['recall']:.1%} precision "
            f"{p['precision']:.1%} F1 {p['f1']:.3f}; F1-optimal image threshold "
            f"{b['threshold']:.4g}: recall {b['recall']:.1%} precision {b['precision']:.1%} "
            f"F1 {b['f1']:.3f}"
        )
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return lines


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a frame that can never alert has region score -inf) become null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`calibration.json` and `histogram.png` in `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "histogram.png"
    if not cv2.imwrite(str(png), render_histogram(report)):
        raise OSError(f"cannot write {png}")
    report = {**report, "histogram": png.name}
    path = out / "calibration.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    tmp.replace(path)
    return path, png
