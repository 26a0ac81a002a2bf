"""Anomaly-detection metrics, computed the way the peer figures (`reference/peers.md`) were judged.

Per class: image AUROC and AP from image scores against "lies in a defect folder"; pixel AUROC and
AP over all pixels of the class's test images; AUPRO (per-region overlap against the false-positive
rate on normal pixels) integrated to FPR 0.3 and divided by 0.3. Masks are compared at the map's
resolution (nearest). AUROC below 0.5 is reported as is — flipping it would hide a broken model.
Image AUROC/AP come from scikit-learn. Pixel figures come from ONE sort of all pixels, which gives
the exact ROC, precision-recall and PRO curves at every distinct score (no threshold grid): the
tests check them against scikit-learn and a brute-force PRO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def _two_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of image scores; NaN when the labels hold only one class."""
    y = np.asarray(labels).astype(bool).ravel()
    return (
        float(roc_auc_score(y, np.asarray(scores, np.float64).ravel()))
        if _two_classes(y)
        else math.nan
    )


def image_ap(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Average precision (sklearn's step-wise AP, the papers' "PR") of image scores."""
    y = np.asarray(labels).astype(bool).ravel()
    if not y.any():
        return math.nan
    return float(average_precision_score(y, np.asarray(scores, np.float64).ravel()))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over every pixel of every image, by scikit-learn (the reference `pixel_metrics`
    is tested against)."""
    return image_auroc(_check(masks, maps), np.asarray(maps).ravel())


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over every pixel of every image, by scikit-learn."""
    return image_ap(_check(masks, maps), np.asarray(maps).ravel())


def _check(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.shape != np.shape(maps):
        raise ValueError(f"mask shape {masks.shape} differs from map shape {np.shape(maps)}")
    return masks.ravel() > 0


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per-pixel PRO weight: 1 / (region size × number of regions) inside defect regions, else 0.

    Regions are the 8-connected components of each image's mask.
    """
    weights = np.zeros(masks.shape, np.float64)
    labelled: list[tuple[int, np.ndarray, np.ndarray]] = []
    n_regions = 0
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
        if n > 1:
            labelled.append((i, lab, np.bincount(lab.ravel(), minlength=n).astype(np.float64)))
            n_regions += n - 1
    for i, lab, sizes in labelled:
        w = 1.0 / (sizes * n_regions)
        w[0] = 0.0
        weights[i] = w[lab]
    return weights


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting `scores` in descending order.

    For float32 (what models emit) the score's order-preserving bit pattern and the pixel index
    are packed into one uint64 and sorted by value: about twice as fast as `argsort` on tens of
    millions of pixels.
    """
    n = scores.size
    if scores.dtype != np.float32 or n >= 1 << 32:
        return np.argsort(scores)[::-1]
    bits = scores.view(np.uint32)
    sign = np.uint32(0x80000000)
    key = np.where(bits & sign, ~bits, bits | sign).astype(np.uint64) << np.uint64(32)
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    return (key[::-1] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _sweep(
    masks: np.ndarray, maps: np.ndarray, with_pro: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cumulative (true positives, false positives, PRO) at every distinct threshold, strictest
    first, from ONE sort of all pixels (ties enter together, as a threshold admits them)."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.shape != maps.shape:
        raise ValueError(f"mask shape {masks.shape} differs from map shape {maps.shape}")
    scores = maps.ravel()
    if not np.isfinite(scores).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    order = _descending_order(scores)  # order inside a run of ties does not matter
    s_sorted = scores[order]
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum((masks.ravel() > 0)[order])[last].astype(np.float64)
    fp = (last + 1) - tp
    pro = np.cumsum(_region_weights(masks).ravel()[order])[last] if with_pro else None
    return tp, fp, pro


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) curve over all thresholds, from the strictest (0, 0) to (1, 1).

    PRO at threshold t is the mean over all defect regions (8-connected components of each
    image's mask) of the fraction of the region's pixels with score >= t; FPR is the fraction of
    all normal pixels (mask 0, in any image) with score >= t.
    """
    tp, fp, pro = _sweep(masks, maps, with_pro=True)
    assert pro is not None
    if tp[-1] == 0:
        raise ValueError("PRO needs at least one defect region")
    if fp[-1] == 0:
        raise ValueError("PRO needs normal pixels for the false-positive rate")
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, pro]


def _area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under (fpr, pro) up to `max_fpr` (interpolated there), / `max_fpr`."""
    i = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:i] <= max_fpr < fpr[i]
    x, y = fpr[:i], pro[:i]
    if i < len(fpr):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        x = np.r_[x, max_fpr]
        y = np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / max_fpr)


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to `max_fpr`, divided by `max_fpr` (1.0 = perfect)."""
    masks = np.asarray(masks)
    if not (masks > 0).any() or (masks > 0).all():
        return math.nan
    return _area_to(*pro_curve(masks, maps), max_fpr)


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, pixel AP and AUPRO from one sort of all pixels.

    The same numbers as sklearn's `roc_auc_score` / `average_precision_score` (checked in the
    tests) at a third of the cost: a 600-image class at 224 px is 30 M pixels, and evaluation
    repeats this for every random prompt draw.
    """
    masks = np.asarray(masks)
    pos = masks > 0
    if not pos.any() or pos.all():
        return {"pixel_auroc": math.nan, "pixel_ap": math.nan, "aupro": math.nan}
    tp, fp, pro = _sweep(masks, maps, with_pro=True)
    assert pro is not None
    tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
    precision = tp / (tp + fp)
    return {
        "pixel_auroc": float(np.trapezoid(tpr, fpr)),
        "pixel_ap": float(np.sum(np.diff(tpr) * precision)),
        "aupro": _area_to(fpr, np.r_[0.0, pro], max_fpr),
    }


def resize_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Binary masks N×H×W resized to the map resolution with nearest neighbour."""
    h, w = shape
    masks = np.asarray(masks)
    if masks.shape[1:] == (h, w):
        return (masks > 0).astype(np.uint8)
    out = [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for m in masks]
    return (np.stack(out) > 0).astype(np.uint8)


def class_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    max_fpr: float = 0.3,
) -> dict[str, float]:
    """All five metrics for one class (image labels = defect folder, masks at map size)."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 4:  # N×1×H×W
        maps = maps[:, 0]
    masks = resize_masks(masks, maps.shape[1:])
    return {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        **pixel_metrics(masks, maps, max_fpr),
    }


def mean_metrics(per_class: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over classes of each metric (classes where it is undefined are skipped)."""
    out: dict[str, float] = {}
    for k in METRIC_KEYS:
        vals = [float(m[k]) for m in per_class.values() if k in m and not math.isnan(float(m[k]))]
        out[k] = float(np.mean(vals)) if vals else math.nan
    return out


def std_metrics(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Population standard deviation of each metric over repeated runs (e.g. prompt draws)."""
    out: dict[str, float] = {}
    for k in METRIC_KEYS:
        vals = [float(r[k]) for r in runs if not math.isnan(float(r[k]))]
        out[k] = float(np.std(vals)) if vals else math.nan
    return out
