"""The calibration histogram as a PNG, drawn with OpenCV (matplotlib is not an edge dependency).

Normal (blue) and defect (red) image-score histograms, each as a fraction of its frames, with the
old threshold dashed grey and the proposed one green, so an engineer sees at a glance where the
proposal sits between the two populations before applying it.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

W, H = 960, 540
LEFT, RIGHT, TOP, BOTTOM = 70, 30, 60, 70
BLUE, RED, GREY, GREEN, BLACK = (
    (200, 120, 30),
    (40, 40, 220),
    (140, 140, 140),
    (40, 160, 40),
    (0,) * 3,
)


def _text(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float = 0.5,
    colour: tuple[int, ...] = BLACK,
    thickness: int = 1,
) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def _dashed_vline(
    img: np.ndarray,
    x: int,
    y0: int,
    y1: int,
    colour: tuple[int, ...],
    thickness: int = 2,
    dash: int = 8,
) -> None:
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
