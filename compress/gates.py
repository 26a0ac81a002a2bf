"""Gates every artifact must pass: exported graphs score like PyTorch, INT8 scores like FP32.

Users of other tools report exported models that no longer reproduce training scores and INT8
models that quietly lose pixel accuracy. Here each figure is measured, compared with a stated
budget, written into `model.json`, and a miss stops the artifact with a message that names the
figure and by how much it missed.

Parity figures (per backend, against PyTorch on the same uint8 images):
* `map_max_rel` / `map_mean_rel` — max / mean |Δmap| divided by the reference maps' range;
* `score_max_rel` — max |Δscore| divided by the reference scores' range;
* `score_spearman` — rank correlation of image scores (ranking is what thresholds act on);
* `tokens_max_rel` — max |Δtokens| of the prompt encoder divided by max |tokens|.
Accuracy figures (INT8 vs FP32, fractions): drops of image AUROC, pixel AP and AUPRO, each with
its own budget, for the class mean AND for every class (a class losing 1.56 pt while the mean
passed was the reason; issue 14). A figure that is NaN (undefined, e.g. a class without defects
in the gate set, or a Spearman correlation of constant scores) fails its gate: an unmeasured
figure is not a passed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr

from lineguard.compress.evalsets import EvalSet
from lineguard.compress.graphs import to_model_input
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.graph_runner import GraphRunner
from lineguard.train.metrics import METRIC_KEYS, class_metrics, mean_metrics
from lineguard.train.torch_model import OneNIP


class GateError(LineGuardError):
    """A gate missed its budget: no artifact (no model.json) is written."""


class ParityBudget(BaseModel):
    """Largest tolerated difference between an exported graph (true f32) and PyTorch."""

    model_config = ConfigDict(extra="forbid")

    map_max_rel: float = Field(1e-3, gt=0, title="max |Δmap| / reference map range")
    map_mean_rel: float = Field(1e-4, gt=0, title="mean |Δmap| / reference map range")
    score_max_rel: float = Field(1e-3, gt=0, title="max |Δscore| / reference score range")
    score_spearman: float = Field(0.999, le=1, title="minimum Spearman rank correlation of scores")
    tokens_max_rel: float = Field(1e-3, gt=0, title="max |Δtokens| / max |tokens|")


class AccuracyBudget(BaseModel):
    """Largest tolerated INT8 metric drop against FP32 (fractions: 0.005 = 0.5 points).

    The class mean has the tight budgets; each class has its own, wider ones, because a class's
    figures rest on a twelfth of a 12-class gate set: with 8 normal validation images and 32
    synthetic defects a class's image AUROC moves in steps of 0.4 pt (one swapped pair), so
    1 pt = two pairs. 1.5 pt of pixel AP still catches a class losing 1.56 pt behind a passing
    mean (the case that made the gate per class).
    """

    model_config = ConfigDict(extra="forbid")

    image_auroc: float = Field(0.005, ge=0, title="max drop of the class-mean image AUROC")
    pixel_ap: float = Field(0.01, ge=0, title="max drop of the class-mean pixel AP")
    aupro: float = Field(0.01, ge=0, title="max drop of the class-mean AUPRO")
    class_image_auroc: float = Field(0.01, ge=0, title="max drop of any one class's image AUROC")
    class_pixel_ap: float = Field(0.015, ge=0, title="max drop of any one class's pixel AP")
    class_aupro: float = Field(0.02, ge=0, title="max drop of any one class's AUPRO")


@dataclass
class Outputs:
    """Raw outputs of one engine on an EvalSet (maps N×H×W, scores N, tokens per class)."""

    maps: np.ndarray
    scores: np.ndarray
    tokens: dict[str, np.ndarray]


@torch.no_grad()
def run_torch(
    model: OneNIP, evalset: EvalSet, prompts: dict[str, np.ndarray], batch: int = 8
) -> Outputs:
    """The reference: `OneNIP.encode_prompt` / `OneNIP.detect` on the same uint8 pixels."""
    model.eval()
    tokens = {
        c: model.encode_prompt(to_model_input(torch.from_numpy(prompts[c][None])))
        for c in sorted(set(evalset.classes))
    }
    n, s = len(evalset), evalset.images.shape[1]
    maps = np.empty((n, s, s), np.float32)
    scores = np.empty(n, np.float64)
    for cls, tok in tokens.items():
        idx = np.flatnonzero(np.asarray(evalset.classes) == cls)
        for start in range(0, len(idx), batch):
            part = idx[start : start + batch]
            amap, score = model.detect(to_model_input(torch.from_numpy(evalset.images[part])), tok)
            maps[part] = amap[:, 0].numpy()
            scores[part] = score.numpy()
    return Outputs(maps, scores, {c: t.numpy() for c, t in tokens.items()})


def run_graphs(
    runner: GraphRunner,
    evalset: EvalSet,
    prompts: dict[str, np.ndarray],
    tokens: dict[str, np.ndarray] | None = None,
) -> Outputs:
    """An exported engine on the set; `tokens` reuses another engine's prompt tokens."""
    if tokens is None:
        tokens = {c: runner.encode_prompt(prompts[c]) for c in sorted(set(evalset.classes))}
    n, s = len(evalset), evalset.images.shape[1]
    maps = np.empty((n, s, s), np.float32)
    scores = np.empty(n, np.float64)
    for i, (img, cls) in enumerate(zip(evalset.images, evalset.classes, strict=True)):
        maps[i], scores[i] = runner.detect(img, tokens[cls])
    return Outputs(maps, scores, tokens)


def parity_figures(ref: Outputs, other: Outputs) -> dict[str, float]:
    """The parity figures of `other` against `ref` (see module docstring)."""
    map_range = float(ref.maps.max() - ref.maps.min()) or 1.0
    diff = np.abs(other.maps.astype(np.float64) - ref.maps)
    score_range = float(np.ptp(ref.scores)) or float(np.abs(ref.scores).max()) or 1.0
    tok_diff = max(
        float(np.abs(other.tokens[c] - ref.tokens[c]).max() / (np.abs(ref.tokens[c]).max() or 1.0))
        for c in ref.tokens
    )
    if len(ref.scores) >= 3 and np.ptp(ref.scores) > 0 and np.ptp(other.scores) > 0:
        rho = float(spearmanr(ref.scores, other.scores).statistic)
    else:
        rho = math.nan
    return {
        "map_max_rel": float(diff.max() / map_range),
        "map_mean_rel": float(diff.mean() / map_range),
        "score_max_rel": float(np.abs(other.scores - ref.scores).max() / score_range),
        "score_spearman": rho,
        "tokens_max_rel": tok_diff,
    }


def check_parity(figures: dict[str, dict[str, float]], budget: ParityBudget, what: str) -> None:
    """Raise GateError naming every figure that missed its budget, and by how much."""
    misses: list[str] = []
    for backend, figs in figures.items():
        for key, limit in budget.model_dump().items():
            value = figs.get(key, math.nan)
            if math.isnan(value):  # undefined is not passed
                misses.append(f"{backend} {key} is undefined (NaN): not measured, not passed")
            elif key == "score_spearman":
                if value < limit:
                    misses.append(
                        f"{backend} {key} = {value:.6f} < {limit} (short by {limit - value:.2e})"
                    )
            elif value > limit:
                misses.append(
                    f"{backend} {key} = {value:.3e} > {limit:.1e} ({value / limit:.1f}x the budget)"
                )
    if misses:
        raise GateError(f"{what} parity gate failed: " + "; ".join(misses))


def metrics(outputs: Outputs, evalset: EvalSet) -> dict[str, dict[str, float]]:
    """Per-class metrics (train stage's definitions) plus their mean under key 'mean'."""
    per_class: dict[str, dict[str, float]] = {}
    classes = np.asarray(evalset.classes)
    for cls in sorted(set(evalset.classes)):
        idx = np.flatnonzero(classes == cls)
        labels = evalset.labels[idx]
        masks = evalset.masks[idx]
        if not masks.any():  # AUPRO/pixel metrics need defect pixels
            per_class[cls] = {k: math.nan for k in METRIC_KEYS}
            continue
        per_class[cls] = class_metrics(labels, outputs.scores[idx], masks, outputs.maps[idx])
    return {"mean": mean_metrics(per_class), **per_class}


GATED_KEYS = ("image_auroc", "pixel_ap", "aupro")  # each has a mean and a per-class budget
CLASS_PREFIX = "class."


def accuracy_figures(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, float]:
    """Both metric sets and the drops (positive = INT8 worse), all fractions.

    `fp32` / `int8` are either mean metrics (`metrics(...)["mean"]`) or the whole output of
    `metrics` (mean plus one dict per class); with the latter, every class's gated figures are
    added as `class.<cls>.fp32_<key>`, `class.<cls>.int8_<key>` and `class.<cls>.<key>_drop`.
    """
    per_class = isinstance(fp32.get("mean"), dict)
    mean_fp32, mean_int8 = (fp32["mean"], int8["mean"]) if per_class else (fp32, int8)
    out: dict[str, float] = {}
    for k in METRIC_KEYS:
        out[f"fp32_{k}"] = mean_fp32[k]
        out[f"int8_{k}"] = mean_int8[k]
        out[f"{k}_drop"] = mean_fp32[k] - mean_int8[k]
    if per_class:
        for cls in sorted(c for c in fp32 if c != "mean"):
            for k in GATED_KEYS:
                a, b = fp32[cls].get(k, math.nan), int8.get(cls, {}).get(k, math.nan)
                out[f"{CLASS_PREFIX}{cls}.fp32_{k}"] = a
                out[f"{CLASS_PREFIX}{cls}.int8_{k}"] = b
                out[f"{CLASS_PREFIX}{cls}.{k}_drop"] = a - b
    return out


def _gate_classes(figures: dict[str, float]) -> list[str]:
    """The classes with per-class figures (`class.<cls>.<key>_drop`), sorted."""
    found = set()
    for name in figures:
        if name.startswith(CLASS_PREFIX) and name.endswith("_drop"):
            found.add(name[len(CLASS_PREFIX) :].rsplit(".", 1)[0])
    return sorted(found)


def _drop_miss(
    figures: dict[str, float], prefix: str, key: str, limit: float, where: str
) -> str | None:
    drop = figures.get(f"{prefix}{key}_drop", math.nan)
    if math.isnan(drop):
        return f"{where}{key} is undefined (NaN: needs normal and defective images)"
    if drop > limit:
        a, b = figures[f"{prefix}fp32_{key}"], figures[f"{prefix}int8_{key}"]
        return (
            f"{where}{key} dropped {100 * drop:.2f} pt (FP32 {100 * a:.2f} -> INT8 "
            f"{100 * b:.2f}), budget {100 * limit:.2f} pt, missed by {100 * (drop - limit):.2f} pt"
        )
    return None


METRIC_BUDGET_KEYS = GATED_KEYS


def check_accuracy(figures: dict[str, float], budget: AccuracyBudget, evaluated_on: str) -> None:
    """Raise GateError when a drop exceeds its budget, for the class mean or any class, or is
    undefined (NaN), naming each miss."""
    misses: list[str] = []
    scopes = [("", ""), *((f"{CLASS_PREFIX}{c}.", f"class {c}: ") for c in _gate_classes(figures))]
    limits = budget.model_dump()
    for key in METRIC_BUDGET_KEYS:
        for prefix, where in scopes:
            limit = limits[f"class_{key}"] if prefix else limits[key]
            miss = _drop_miss(figures, prefix, key, limit, where)
            if miss:
                misses.append(miss)
    if misses:
        raise GateError(f"INT8 accuracy gate failed on {evaluated_on}: " + "; ".join(misses))
