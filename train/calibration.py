"""Calibration from NORMAL validation images only: fusion scale c and score normalisation.

The final map is ``(1-α)·S_rec + α·c·M̂``. The official code sets c = (max + min)/2 of S_rec over
the whole TEST set (spec §8), which a station cannot know. Our rule, measured on normal
validation images (carved from train/good, each scored against its class's fixed prompt), is
z-score fusion: c = std(S_rec) / std(M̂) over all their pixels, so each map counts in units of
its own spread on normal parts. Where M̂ is constant on them (std 0) we fall back to the
official formula on validation pixels, c = (max + min)/2 of S_rec.

Why this rule (``benchmarks/fusion_scale.py``, results in ``benchmarks/results/fusion_scale_*``):
on mid-training checkpoints of piped and mtd, the std ratio beat the midrange rule — even the
transductive TEST-set midrange of the official code — on image AUROC and AUPRO on both datasets
(mtd: image AUROC 85.8 vs 78.0, pixel AP 26.4 vs 19.3), and the plain range ratio sits in
between. A trained refiner is near 0 on normal pixels, so c is large (10³–10⁴): M̂ decides where
it fires and S_rec orders the rest. Compress's FP32/INT8 parity gate must watch that c amplifies
any quantisation error of M̂.

Score normalisation (``(raw - center) / scale``, applied by the runtime): center = median and
scale = p99 − median of the image scores (pixel values) of the same images, so 1.0 ≈ the 99th
percentile of normal validation images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lineguard.train.torch_model import OneNIP


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 ``B×H×W×3`` -> float ``B×3×H×W`` in [0, 1] on ``device``."""
    t = torch.as_tensor(images).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def score_parts(
    model: OneNIP,
    images: np.ndarray,
    labels: Sequence[int],
    prompts: Sequence[np.ndarray],
    device: torch.device | str,
    batch_size: int = 16,
    with_match: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(S_rec, M̂, H) as float32 ``N×H×W`` for each image against its class's fixed prompt;
    H (the prompt match) when the model uses it or ``with_match``, else None."""
    was_training = model.training
    model.eval()
    labels = np.asarray(labels)
    n, h, w = len(images), images.shape[1], images.shape[2]
    s_rec = np.zeros((n, h, w), np.float32)
    m_hat = np.zeros((n, h, w), np.float32)
    match = None
    for cls in np.unique(labels):
        tokens = model.encode_prompt(to_tensor(prompts[int(cls)][None], device), with_match)
        idx = np.flatnonzero(labels == cls)
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            s, m, hm = model.detect_parts(to_tensor(images[part], device), tokens)
            s_rec[part] = s[:, 0].float().cpu().numpy()
            m_hat[part] = m[:, 0].float().cpu().numpy()
            if hm is not None:
                match = np.zeros((n, h, w), np.float32) if match is None else match
                match[part] = hm[:, 0].float().cpu().numpy()
    model.train(was_training)
    return s_rec, m_hat, match


def midrange_scale(s_rec: np.ndarray) -> float:
    """Official formula on normal pixels: c = (max + min)/2 of S_rec."""
    c = 0.5 * (float(s_rec.max()) + float(s_rec.min()))
    return c if np.isfinite(c) and c > 0 else 1.0


def fusion_scale(s_rec: np.ndarray, m_hat: np.ndarray) -> float:
    """c = std(S_rec) / std(M̂) over all normal validation pixels (see module docstring)."""
    s_std = float(np.std(s_rec, dtype=np.float64))
    m_std = float(np.std(m_hat, dtype=np.float64))
    if m_std <= 1e-12 or not np.isfinite(s_std / m_std) or s_std <= 0:
        return midrange_scale(s_rec)
    return s_std / m_std


def learned_map(model: OneNIP, s_rec: np.ndarray, m_hat: np.ndarray) -> np.ndarray:
    """The trained model's map ``(1-α)·S_rec + α·c·M̂``."""
    alpha = model.cfg.fusion_alpha
    return (1.0 - alpha) * s_rec + alpha * float(model.fusion_scale) * m_hat


def match_scale(learned: np.ndarray, match: np.ndarray) -> float:
    """k = std(learned map) / std(H) over normal validation pixels: the same z-score rule as c."""
    a, h = float(np.std(learned, dtype=np.float64)), float(np.std(match, dtype=np.float64))
    k = a / h if h > 1e-12 else 1.0
    return k if np.isfinite(k) and k > 0 else 1.0


def blend(learned: np.ndarray, match: np.ndarray, weight: float, k: float) -> np.ndarray:
    """``(1-w)·learned + w·k·H``: the final map when the prompt match has share ``w``."""
    return (1.0 - weight) * learned + weight * k * match


@torch.no_grad()
def stats_parts(
    model: OneNIP, images: np.ndarray, device: torch.device | str, batch_size: int = 16
) -> np.ndarray:
    """G, the normal statistics' map (:mod:`lineguard.train.normal_stats`), float32 ``N×H×W``;
    it does not depend on the prompt."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(images), images.shape[1], images.shape[2]), np.float32)
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size], device)
        out[start : start + len(x)] = model.stats_map(model.taps(x))[:, 0].float().cpu().numpy()
    model.train(was_training)
    return out


def image_scores(model: OneNIP, amap: np.ndarray) -> np.ndarray:
    """Image scores of ``N×H×W`` maps by the model's own pooling rule."""
    with torch.no_grad():
        return model.image_score(torch.from_numpy(amap[:, None])).numpy()


def prompt_map(
    model: OneNIP, s_rec: np.ndarray, m_hat: np.ndarray, match: np.ndarray | None = None
) -> np.ndarray:
    """The map before the normal statistics: the learned map, blended with the prompt match
    when the model uses it."""
    amap = learned_map(model, s_rec, m_hat)
    if model.uses_match:
        if match is None:
            raise ValueError("the model fuses the prompt match but no match map was scored")
        amap = blend(amap, match, model.cfg.match_weight, float(model.match_scale))
    return amap


def fused(
    model: OneNIP,
    s_rec: np.ndarray,
    m_hat: np.ndarray,
    match: np.ndarray | None = None,
    stats: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused maps and image scores exactly as :meth:`OneNIP.detect` computes them."""
    amap = prompt_map(model, s_rec, m_hat, match)
    if model.uses_stats:
        if stats is None:
            raise ValueError("the model fuses the normal statistics but their map was not scored")
        amap = blend(amap, stats, model.cfg.stats_weight, float(model.stats_scale))
    return amap, image_scores(model, amap)


def measure_scales(
    model: OneNIP,
    s_rec: np.ndarray,
    m_hat: np.ndarray,
    match: np.ndarray | None,
    stats: np.ndarray | None,
) -> None:
    """Set c, k and k_g from the maps of NORMAL images, each step of the fusion in turn."""
    model.fusion_scale.fill_(fusion_scale(s_rec, m_hat))
    if match is not None:
        model.match_scale.fill_(match_scale(learned_map(model, s_rec, m_hat), match))
    if stats is not None:
        model.stats_scale.fill_(match_scale(prompt_map(model, s_rec, m_hat, match), stats))


def scales(model: OneNIP) -> dict[str, float]:
    """The fusion's scales as a calibration records them."""
    return {
        "fusion_scale": float(model.fusion_scale),
        "match_scale": float(model.match_scale),
        "stats_scale": float(model.stats_scale),
    }


def _robust(values: np.ndarray) -> dict[str, float]:
    center = float(np.median(values))
    scale = float(np.percentile(values, 99)) - center
    return {"center": center, "scale": scale if scale > 1e-12 else 1.0}


def normalisation(scores: np.ndarray, maps: np.ndarray, source: str) -> dict:
    """``{image: {center, scale}, pixel: {center, scale}, count, source}``."""
    return {
        "image": _robust(np.asarray(scores, np.float64)),
        "pixel": _robust(np.asarray(maps, np.float32).ravel()),
        "count": len(scores),
        "source": source,
    }


def calibrate(
    model: OneNIP,
    images: np.ndarray,
    labels: Sequence[int],
    prompts: Sequence[np.ndarray],
    device: torch.device | str,
    source: str = "val",
    batch_size: int = 16,
) -> dict:
    """Measure c (and k, k_g where those maps are used), store them in the model, and return
    the normalisation dict."""
    s_rec, m_hat, match = score_parts(model, images, labels, prompts, device, batch_size)
    stats = stats_parts(model, images, device, batch_size) if model.uses_stats else None
    measure_scales(model, s_rec, m_hat, match, stats)
    amap, scores = fused(model, s_rec, m_hat, match, stats)
    return {**normalisation(scores, amap, source), **scales(model)}
