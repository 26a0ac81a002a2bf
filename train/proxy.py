"""The validation proxy: how well a model separates normal from synthetic-defect VALIDATION images.

Test sets are for the final report only, so every choice made during training (which checkpoint
to keep, when to stop, which recipe wins) rests on this number. The validation images are normal
images carved from ``train/good`` that the model never trained on; each gets a synthetic defect
drawn with a fixed seed (the same ones at every evaluation), and every image is scored against
its class's FIXED golden prompt, as a station would. One pass scores the normal and defective
halves; the normal half also gives the fusion scale c and the score normalisation
(:mod:`lineguard.train.calibration`), so the proxy judges the model exactly as it would ship.

proxy = mean of the image AUROC (normal vs defective) and the pixel AP of the synthetic masks.
"""

from __future__ import annotations

import numpy as np
import torch

# imported here, not lazily: its first import (~1 s) would count as the cost of an evaluation
# in the budget's reserve
from sklearn.metrics import average_precision_score, roc_auc_score

from lineguard.train.calibration import (
    blend,
    fused,
    image_scores,
    learned_map,
    match_scale,
    measure_scales,
    normalisation,
    scales,
    score_parts,
    stats_parts,
)
from lineguard.train.judge_defects import JudgeDefects
from lineguard.train.torch_model import OneNIP
from lineguard.train.train_data import TrainingData


def synthetic_validation(
    data: TrainingData, synth, seed: int, limit: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defective images, their masks, labels): one fixed synthetic defect per validation image."""
    images, labels = data.val_images[:limit], data.val_labels[:limit]
    out = [
        synth(img, np.random.default_rng([seed, 999_999, i]), int(lab))
        for i, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]
    if not out:
        empty = np.zeros((0, *images.shape[1:3]), np.float32)
        return images[:0], empty, labels[:0]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), labels


def proxy_and_calibration(
    model: OneNIP,
    data: TrainingData,
    defects: tuple[np.ndarray, np.ndarray, np.ndarray],
    device,
) -> tuple[dict[str, float], dict]:
    """Score normal + synthetic validation images once; set c; return (metrics, calibration).

    Calibration (c and the normalisation) uses the NORMAL validation images only. Without
    validation images (``val_fraction`` 0) it falls back to the training images and no proxy
    is reported.
    """
    prompts = data.prompt_images()
    normal, labels, source = data.val_images, data.val_labels, "val"
    if len(normal) == 0:
        normal, labels, source = data.train_images, data.train_labels, "train"
    bad, masks, bad_labels = defects
    both = np.concatenate([normal, bad]) if len(bad) else normal
    s_rec, m_hat, match = score_parts(
        model, both, np.concatenate([labels, bad_labels]), prompts, device
    )
    stats = stats_parts(model, both, device) if model.uses_stats else None
    n = len(normal)
    measure_scales(
        model,
        s_rec[:n],
        m_hat[:n],
        None if match is None else match[:n],
        None if stats is None else stats[:n],
    )
    amap, scores = fused(model, s_rec, m_hat, match, stats)
    calib = {**normalisation(scores[:n], amap[:n], source), **scales(model)}
    if len(bad) == 0 or source != "val":
        return {}, calib
    return separation(scores, amap, n, masks), calib


def separation(scores: np.ndarray, amap: np.ndarray, n: int, masks: np.ndarray) -> dict:
    """Proxy figures of ``n`` normal images followed by defective ones with ``masks``."""
    bad = len(scores) - n
    y = np.r_[np.zeros(n), np.ones(bad)]
    image_auroc = float(roc_auc_score(y, scores))
    # pixel AP over the defective half only: normal images add true negatives, not information
    truth = (masks.reshape(bad, -1) > 0.5).ravel()
    pixel_ap = float(average_precision_score(truth, amap[n:].reshape(bad, -1).ravel()))
    return {
        "val_synthetic_image_auroc": image_auroc,
        "val_synthetic_pixel_ap": pixel_ap,
        "val_proxy": 0.5 * (image_auroc + pixel_ap),
    }


#: Gaussian σ (input pixels) tried for the map smoothing; the first best wins ties (least blur)
BLUR_SIGMAS = (0.0, 1.0, 2.0, 4.0)


def choose_map_blur(
    model: OneNIP,
    data: TrainingData,
    defects: tuple[np.ndarray, np.ndarray, np.ndarray],
    device,
    sigmas: tuple[float, ...] = BLUR_SIGMAS,
) -> tuple[dict, dict]:
    """Pick the map smoothing with the best validation proxy and leave the model calibrated
    with it. Returns (the record a checkpoint keeps as ``metrics["map_blur"]``: ``sigma``, its
    ``val_proxy`` and the proxy of every σ ``tried``; its calibration).

    Why on validation: a Gaussian on the maps (anomalib's PatchCore and PaDiM smooth with σ 4
    at 256 px) helps where defects are blobs and can hurt specks; the data says which.
    """
    tried: dict[str, dict[str, float]] = {}
    best: tuple[float, dict, dict] | None = None
    for sigma in sigmas:
        model.set_map_blur(sigma)
        proxy, calib = proxy_and_calibration(model, data, defects, device)
        tried[f"{sigma:g}"] = proxy
        value = proxy.get("val_proxy", -np.inf)
        if best is None or value > best[1].get("val_proxy", -np.inf):
            best = (sigma, proxy, calib)
    assert best is not None
    sigma, proxy, calib = best
    model.set_map_blur(sigma)
    model.fusion_scale.fill_(calib["fusion_scale"])
    calib = {**calib, "map_blur_sigma": sigma}
    return {"sigma": model.cfg.map_blur_sigma, "val_proxy": proxy, "tried": tried}, calib


def judge_validation(data: TrainingData, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out judge defects (:mod:`lineguard.train.judge_defects`, a family the model
    never trained on) drawn with ``seed`` on the normal validation images."""
    return synthetic_validation(data, JudgeDefects(), seed)


#: shares of the prompt match tried; the first best wins ties (the learned map alone first)
MATCH_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
#: zooms of the prompt match tried, cheapest first (a zoom costs one more backbone pass)
MATCH_ZOOMS = (1, 2)


def choose_match_weight(
    model: OneNIP,
    data: TrainingData,
    device,
    judge: tuple[np.ndarray, np.ndarray, np.ndarray],
    weights: tuple[float, ...] = MATCH_WEIGHTS,
    zooms: tuple[int, ...] = MATCH_ZOOMS,
) -> tuple[dict, dict, np.ndarray]:
    """Pick the share and the zoom of the prompt match (:mod:`lineguard.train.prompt_match`) on
    HELD-OUT judge defects (``judge``: :func:`judge_validation`) and set them with the
    scale k. Returns
    (what was tried, the calibration of the final map, that map on the normal validation images
    followed by the judge's: :func:`choose_stats_weight` starts from it instead of scoring the
    judge set again, a second zoom-2 pass that overran a budget). Call after
    :func:`choose_map_blur`
    (c and the smoothing are kept). Order of the tries: share 0 (the learned map alone, the
    same at every zoom), then each zoom's shares; the first best wins, so a costlier map must
    do strictly better.

    Why not the usual proxy: its defects come from the training synthesis, which the refiner
    learned, so it favours the learned map over anything untrained whatever the real defects.
    """
    normal, labels = data.val_images, data.val_labels
    if len(normal) == 0:
        raise ValueError("choosing the prompt match needs validation images")
    bad, masks, bad_labels = judge
    both = np.concatenate([normal, bad])
    all_labels = np.concatenate([labels, bad_labels])
    prompts = data.prompt_images()
    n = len(normal)
    tried: dict[str, dict[str, dict[str, float]]] = {}
    best: tuple[float, int, float, float, np.ndarray, np.ndarray] | None = None
    for zoom in zooms:
        model.cfg.match_zoom = int(zoom)
        s_rec, m_hat, match = score_parts(model, both, all_labels, prompts, device, with_match=True)
        assert match is not None
        learned = learned_map(model, s_rec, m_hat)
        k = match_scale(learned[:n], match[:n])
        tried[str(zoom)] = {}
        for w in weights:
            if w == 0.0 and best is not None:
                continue  # the learned map alone was judged at the first zoom
            amap = blend(learned, match, w, k)
            scores = image_scores(model, amap)
            figures = separation(scores, amap, n, masks)
            tried[str(zoom)][f"{w:g}"] = figures
            if best is None or figures["val_proxy"] > best[2]:
                best = (w, zoom, figures["val_proxy"], k, scores, amap)
    assert best is not None
    w, zoom, _, k, scores, amap = best
    model.cfg.match_weight = float(w)
    model.cfg.match_zoom = int(zoom) if w > 0 else 1
    model.match_scale.fill_(k)
    calib = {**normalisation(scores[:n], amap[:n], "val"), **scales(model)}
    info = {
        "weight": float(w),
        "zoom": model.cfg.match_zoom,
        "match_scale": k,
        "judge": "held-out defect family (train/judge_defects.py), never trained on",
        "tried": tried,
    }
    return info, calib, amap


#: shares of the normal statistics tried; the first best wins ties (none first)
STATS_WEIGHTS = (0.0, 0.25, 0.5, 0.75)


def choose_stats_weight(
    model: OneNIP,
    data: TrainingData,
    device,
    judge: tuple[np.ndarray, np.ndarray, np.ndarray],
    base: np.ndarray,
    weights: tuple[float, ...] = STATS_WEIGHTS,
) -> tuple[dict, dict]:
    """Pick the share of the normal statistics (:mod:`lineguard.train.normal_stats`, fitted
    already) on the HELD-OUT judge defects, after :func:`choose_match_weight`, whose chosen map
    of the same images is ``base``, and set k_g. Returns (what was tried, the calibration of
    the final map). A share of 0 drops the statistics from the model, so the exported detector
    does not carry them.
    """
    normal = data.val_images
    if len(normal) == 0:
        raise ValueError("choosing the normal statistics' share needs validation images")
    model.cfg.stats_weight = 0.0
    bad, masks, _ = judge
    g, n = stats_parts(model, np.concatenate([normal, bad]), device), len(normal)
    k = match_scale(base[:n], g[:n])
    tried: dict[str, dict[str, float]] = {}
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for w in weights:
        amap = blend(base, g, w, k)
        scores = image_scores(model, amap)
        tried[f"{w:g}"] = figures = separation(scores, amap, n, masks)
        if best is None or figures["val_proxy"] > best[1]:
            best = (w, figures["val_proxy"], scores, amap)
    assert best is not None
    w, _, scores, amap = best
    model.cfg.stats_weight = float(w)
    model.stats_scale.fill_(k if w > 0 else 1.0)
    if w == 0:
        model.set_normal_stats(torch.zeros(0), torch.zeros(0))
    calib = {**normalisation(scores[:n], amap[:n], "val"), **scales(model)}
    info = {
        "weight": float(w),
        "stats_scale": float(model.stats_scale),
        "judge": "held-out defect family (train/judge_defects.py), never trained on",
        "tried": tried,
    }
    return info, calib


def recipe_score(metrics: dict) -> dict[str, float | None]:
    """How recipes are ranked: the mean of the training-family proxy of the kept, smoothed
    learned map and the held-out judge's figure for the shipped map (prompt match included).

    Why both: the proxy's defects come from the training synthesis (2–15 % of the image), so it
    rewards whatever the refiner learned to find; the judge's family was never trained on. On
    mtd they disagreed about 160 vs 128 px (proxy −0.004, judge +0.016), so neither decides
    alone. ``metrics`` is a checkpoint's ``metrics``; a missing half gives ``score`` None.
    """
    blur = metrics.get("map_blur") or {}
    proxy = (blur.get("val_proxy") or {}).get("val_proxy", metrics.get("val_proxy"))
    judge = None
    match = metrics.get("prompt_match") or {}
    if match.get("tried"):
        chosen = match["tried"].get(str(match["zoom"]), {}).get(f"{match['weight']:g}")
        if chosen is None:  # the learned map alone is judged once, at the first zoom
            chosen = next(iter(match["tried"].values())).get(f"{match['weight']:g}")
        judge = chosen and chosen.get("val_proxy")
    stats = metrics.get("normal_stats") or {}
    if stats.get("tried"):  # the shipped map is the one after the normal statistics' choice
        judge = stats["tried"][f"{stats['weight']:g}"].get("val_proxy")
    score = None if proxy is None or judge is None else 0.5 * (proxy + judge)
    return {"proxy": proxy, "judge": judge, "score": score}
