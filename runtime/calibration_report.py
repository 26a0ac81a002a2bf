"""Calibration report: proposal + metrics as JSON, and a PNG histogram (drawn with OpenCV).

`make_report` turns the scores of normal (and optionally defective) frames into a proposal and
everything an engineer needs to trust it before committing: the method, the estimate and margin,
the in-sample false-alarm rate at the old and new thresholds, and with defect images recall,
precision and F1 at the proposed and at the F1-optimal image threshold. All rates are at the
DECISION level of the pipeline (image score ≥ T and, unless the pipeline alerts on the image
score alone, a region at the pixel threshold), i.e. what the station would actually alert on.

Thresholds are rounded UP to `ROUND` decimals so the written value is never below the bound.
Matplotlib is not an edge dependency, so the histogram is drawn with cv2/numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.runtime import calibration as cal
from lineguard.runtime.calibration_scoring import ScoreSet
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


def _metrics(normal: ScoreSet, defects: ScoreSet | None, t: dict, require_region: bool) -> dict:
    n_dec = normal.decision_scores(t["pixel"], require_region)
    out: dict[str, Any] = {
        "thresholds": t,
        "normal_alarm_rate": float(np.mean(n_dec >= t["image"])) if len(normal) else 0.0,
        "normal_image_rate": float(np.mean(normal.arrays()[0] >= t["image"])),
    }
    if defects is not None and len(defects):
        d_dec = defects.decision_scores(t["pixel"], require_region)
        out.update(cal.classification_at(n_dec, d_dec, t["image"]))
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
    image = cal.propose_threshold(image_scores, target_far, confidence, n_boot=n_boot, seed=seed)
    if normal.pixels is None:
        raise ValueError("normal scores were collected without pixel scores")
    pixel = cal.propose_pixel_threshold(normal.pixels, pixel_rate, confidence, seed=seed)
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
        best = cal.f1_optimal(n_dec, d_dec)
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


# ---------------------------------------------------------------------------- PNG histogram

W, H = 960, 540
LEFT, RIGHT, TOP, BOTTOM = 70, 30, 60, 70
BLUE, RED, GREY, GREEN, BLACK = (
    (200, 120, 30),
    (40, 40, 220),
    (140, 140, 140),
    (40, 160, 40),
    (0,) * 3,
)


def _text(img, text, org, scale=0.5, colour=BLACK, thickness=1) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def _dashed_vline(img, x, y0, y1, colour, thickness=2, dash=8) -> None:
    for y in range(y0, y1, 2 * dash):
        cv2.line(img, (x, y), (x, min(y + dash, y1)), colour, thickness, cv2.LINE_AA)


def render_histogram(report: dict[str, Any], bins: int = 50) -> np.ndarray:
    """BGR image: normal (blue) and defect (red) image-score histograms, each as a fraction of
    its frames; old threshold grey dashed, proposed green; defect scores beyond the plotted
    range are counted in a last '>' bar so the normal tail stays readable."""
    normal = np.array([v for v in report["scores"]["normal"]["image"] if v is not None])
    defects = report["scores"].get("defects") or {}
    defect = np.array([v for v in defects.get("image", []) if v is not None])
    old, new = float(report["old"]["image"]), float(report["proposed"]["image"])
    lo = float(min(normal.min(), old, new, defect.min() if defect.size else np.inf))
    core_hi = float(max(normal.max(), old, new))
    hi = core_hi + 0.4 * (core_hi - lo) + 1e-6
    if defect.size and defect.max() <= 2.5 * hi - 1.5 * lo:
        hi = max(hi, float(defect.max()) + 1e-6)
    edges = np.linspace(lo, hi, bins + 1)
    img = np.full((H, W, 3), 255, np.uint8)
    x0, x1, y0, y1 = LEFT, W - RIGHT - 40, TOP, H - BOTTOM  # room for the overflow bar

    def xpix(v: float) -> int:
        return round(x0 + (min(max(v, lo), hi) - lo) / (hi - lo) * (x1 - x0))

    def hist(v: np.ndarray) -> tuple[np.ndarray, float]:
        if v.size == 0:
            return np.zeros(bins), 0.0
        return np.histogram(v[v <= hi], edges)[0] / v.size, float(np.mean(v > hi))

    (hn, on), (hd, od) = hist(normal), hist(defect)
    top = max(hn.max(initial=0), hd.max(initial=0), 1e-9) * 1.15
    bar_w = (x1 - x0) / bins
    overlay = img.copy()
    for counts, over, colour, slot in ((hn, on, BLUE, 0), (hd, od, RED, 1)):
        for i, c in enumerate(counts):
            if c > 0:
                xa = int(x0 + i * bar_w)
                ya = int(y1 - c / top * (y1 - y0))
                cv2.rectangle(overlay, (xa, ya), (int(xa + bar_w), y1), colour, -1)
        if over > 0:  # beyond the plotted range: a capped bar with its share written on it
            xa = x1 + 8 + 14 * slot
            ya = int(y1 - min(over / top, 1.0) * (y1 - y0))
            cv2.rectangle(overlay, (xa, ya), (xa + 12, y1), colour, -1)
            _text(overlay, f"{over:.0%}", (xa - 8, ya - 6 - 14 * slot), 0.4, colour)
    img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    cv2.line(img, (x0, y1), (x1, y1), BLACK, 1)
    cv2.line(img, (x0, y0), (x0, y1), BLACK, 1)
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        x = xpix(v)
        cv2.line(img, (x, y1), (x, y1 + 5), BLACK, 1)
        _text(img, f"{v:.3g}", (x - 15, y1 + 22), 0.45)
        frac = top * i / 5
        y = int(y1 - frac / top * (y1 - y0))
        cv2.line(img, (x0 - 5, y), (x0, y), BLACK, 1)
        _text(img, f"{frac:.2f}", (x0 - 50, y + 5), 0.4)
    if od > 0 or on > 0:
        _text(img, f">{hi:.3g}", (x1 + 2, y1 + 40), 0.4)
    _dashed_vline(img, xpix(old), y0, y1, GREY)
    cv2.line(img, (xpix(new), y0), (xpix(new), y1), GREEN, 2, cv2.LINE_AA)
    _text(img, "image score (normalised)", (W // 2 - 100, H - 20), 0.55)
    _text(img, "fraction of frames", (5, y0 - 15), 0.45)
    st = report["station"]
    title = (
        f"{st.get('line')}/{st.get('id')}: {len(normal)} normal"
        + (f", {defect.size} defect" if defect.size else "")
        + f" | target FAR {report['target_far']:g} @ {report['confidence']:.0%}"
    )
    _text(img, title, (x0, 25), 0.6, BLACK, 1)
    legend = [
        ("normal", BLUE),
        *([("defect", RED)] if defect.size else []),
        (f"old {old:.4g}", GREY),
        (f"new {new:.4g}", GREEN),
    ]
    for i, (label, colour) in enumerate(legend):
        y = y0 + 10 + 22 * i
        cv2.rectangle(img, (x1 - 150, y - 10), (x1 - 135, y + 3), colour, -1)
        _text(img, label, (x1 - 128, y + 2), 0.5)
    return img


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
