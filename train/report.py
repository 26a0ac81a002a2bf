"""Evaluation reports: JSON, a markdown table, and one PNG per class (image | truth | overlay).

The overlay's colour scale comes from the checkpoint's calibration (measured on NORMAL validation
pixels: 1.0 = their 99th percentile), so the pictures are comparable across classes and runs and
never depend on the test images; without calibration the class's own map range is used, for
display only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.train.metrics import METRIC_KEYS
from lineguard.train.pack import Pack

HEADERS = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO",
}


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Per-class rows, the mean, random-prompt mean ± std and retrieval (values × 100)."""
    cols = [HEADERS[k] for k in METRIC_KEYS]
    lines = ["| class | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for cls, m in results["per_class"].items():
        lines.append(f"| {cls} | " + " | ".join(_pct(m[k]) for k in METRIC_KEYS) + " |")
    mean = results["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{_pct(mean[k])}**" for k in METRIC_KEYS) + " |")
    rp = results.get("random_prompt")
    if rp:
        n = len(rp.get("draws", []))
        cells = [f"{_pct(rp['mean'][k])} ± {_pct(rp['std'][k])}" for k in METRIC_KEYS]
        lines.append(f"| random prompts ({n} draws) | " + " | ".join(cells) + " |")
    ret = results.get("retrieval")
    if ret:
        cells = [_pct(ret["mean"][k]) for k in METRIC_KEYS]
        lines.append("| retrieved prompts | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if results.get("retrieval_accuracy") is not None:
        text += (
            f"\nPrompt retrieval picked the right class for {_pct(results['retrieval_accuracy'])}"
        )
        text += " % of test images.\n"
    tiled = results.get("maps_at") == "original image size"
    maps_at = (
        "tiled, maps stitched at the ORIGINAL image size; masks at their own size"
        if tiled
        else "maps at the model input resolution; masks resized nearest"
    )
    text += (
        f"\nFractions × 100. Fixed prompt per class; {maps_at}; image label = defect folder; "
        "AUROC not flipped; AP = sklearn average precision; AUPRO to FPR 0.3, normalised.\n"
    )
    rules = results.get("image_score") if tiled else None
    for cls, rule in (rules or {}).items():
        text += f"Image score of {cls}: {rule}.\n"
    return text


def json_safe(obj: Any) -> Any:
    """NaN -> None so the JSON stays standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def results_json(results: Mapping[str, Any]) -> str:
    """Standard JSON (NaN as null) of evaluation results."""
    return json.dumps(json_safe(results), indent=2)


def write_reports(out_dir: Path, results: Mapping[str, Any]) -> None:
    """`metrics.json` and `metrics.md` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(results_json(results) + "\n")
    (out_dir / "metrics.md").write_text(markdown_table(results))


def _display_range(maps: np.ndarray, calibration: Mapping[str, Any] | None) -> tuple[float, float]:
    pix = (calibration or {}).get("pixel") if calibration else None
    if pix and pix.get("scale"):
        # 0 at the median normal pixel, full red at 3× the p99 distance above it
        return float(pix["center"]), float(pix["center"]) + 3.0 * float(pix["scale"])
    lo, hi = float(maps.min()), float(maps.max())
    return lo, hi if hi > lo else lo + 1.0


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """RGB image blended with a JET colouring of the map (clipped to [lo, hi])."""
    v = np.clip((amap - lo) / (hi - lo), 0.0, 1.0)
    heat = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 0.5, heat, 0.5, 0.0)


def class_figures(
    out_dir: Path,
    test: Pack,
    maps: np.ndarray,
    scores: np.ndarray,
    calibration: Mapping[str, Any] | None = None,
    rows: int = 4,
) -> list[Path]:
    """`<out_dir>/<class>.png`: up to `rows` defective and one normal test image per class."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = _display_range(maps, calibration)
    written = []
    cats = np.array([s.category for s in test.samples])
    for cls in sorted(set(cats.tolist())):
        idx = np.flatnonzero(cats == cls)
        bad = [i for i in idx if test.samples[i].label == 1]
        good = [i for i in idx if test.samples[i].label == 0]
        # spread the picks over the defective images, keep one normal image for contrast
        pick = (
            [bad[int(j)] for j in np.linspace(0, len(bad) - 1, min(rows, len(bad)))] if bad else []
        )
        pick += good[:1]
        tiles = []
        for i in pick:
            img = test.images[i]
            gt = np.repeat(test.masks[i][..., None] * 255, 3, axis=2).astype(np.uint8)
            ov = overlay(img, maps[i], lo, hi)
            row = np.concatenate([img, gt, ov], axis=1)
            k = max(1, 192 // img.shape[0])  # small inputs are enlarged (nearest) to be legible
            if k > 1:
                row = cv2.resize(row, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
            s = test.samples[i]
            cv2.putText(
                row,
                f"{s.defect} score {scores[i]:.3g}",
                (4, 14),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                (255, 255, 0),
                1,
                cv2.LINE_AA,
            )
            tiles.append(row)
        if not tiles:
            continue
        grid = np.concatenate(tiles, axis=0)
        path = out_dir / f"{cls}.png"
        cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        written.append(path)
    return written
