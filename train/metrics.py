"""Anomaly-detection metrics, computed the way the peer figures (`reference/peers.md`) were judged.

Per class: image AUROC and AP from image scores against "lies in a defect folder"; pixel AUROC and
AP over all pixels of the class's test images; AUPRO (per-region overlap against the false-positive
rate on normal pixels) integrated to FPR 0.3 and divided by 0.3. Masks are compared at the map's
resolution (nearest). AUROC below 0.5 is reported as is — flipping it would hide a broken model.
AUROC/AP come from scikit-learn; AUPRO uses one sort over all pixels, which gives the exact curve at
every distinct score (no threshold grid to tune).
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
    """ROC AUC over every pixel of every image (masks {0,1} and maps of the same shape)."""
    return image_auroc(_check(masks, maps), np.asarray(maps).ravel())


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over every pixel of every image."""
    return image_ap(_check(masks, maps), np.asarray(maps).ravel())


def _check(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.shape != np.shape(maps):
        raise ValueError(f"mask shape {masks.shape} differs from map shape {np.shape(maps)}")
    return masks.ravel() > 0


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) curve over all thresholds, from the strictest (0, 0) to (1, 1).

    Regions are the 8-connected components of each image's mask. PRO at threshold t is the mean
    over all regions of the fraction of the region's pixels with score >= t; FPR is the fraction of
    all normal pixels (mask 0, in any image) with score >= t. Each region pixel therefore weighs
    1 / (region size × number of regions), and a cumulative sum over pixels sorted by descending
    score gives both curves at once.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.shape != maps.shape:
        raise ValueError(f"mask shape {masks.shape} differs from map shape {maps.shape}")
    weights = np.zeros(masks.shape, np.float64)
    n_regions = 0
    region_sizes: list[np.ndarray] = []
    labelled: list[tuple[int, np.ndarray]] = []
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
        if n > 1:
            sizes = np.bincount(lab.ravel(), minlength=n).astype(np.float64)
            labelled.append((i, lab))
            region_sizes.append(sizes)
            n_regions += n - 1
    if n_regions == 0:
        raise ValueError("PRO needs at least one defect region")
    for (i, lab), sizes in zip(labelled, region_sizes, strict=True):
        w = 1.0 / (sizes * n_regions)
        w[0] = 0.0
        weights[i] = w[lab]
    normal = (masks <= 0).ravel()
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("PRO needs normal pixels for the false-positive rate")
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    fpr = np.cumsum(normal[order], dtype=np.float64) / n_normal
    pro = np.cumsum(weights.ravel()[order])
    # keep the last position of each run of equal scores: a threshold admits all ties together
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to `max_fpr`, divided by `max_fpr` (1.0 = perfect)."""
    masks = np.asarray(masks)
    if not (masks > 0).any() or (masks > 0).all():
        return math.nan
    fpr, pro = pro_curve(masks, maps)
    i = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:i] <= max_fpr < fpr[i]
    x, y = fpr[:i], pro[:i]
    if i < len(fpr):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        x = np.r_[x, max_fpr]
        y = np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / max_fpr)


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
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_ap": pixel_ap(masks, maps),
        "aupro": aupro(masks, maps, max_fpr),
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
