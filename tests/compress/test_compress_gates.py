"""Issue 14, finding 13: the INT8 gate compared only the class-mean image AUROC and pixel AP (on
piped one class lost 1.56 pt while the mean passed) and the parity gate accepted a NaN
Spearman. Now image AUROC, pixel AP and AUPRO are gated for the mean and for every class, each
with its budget, and NaN fails. Small arrays only: no model, no quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lineguard.compress.evalsets import EvalSet
from lineguard.compress.gates import (
    AccuracyBudget,
    GateError,
    Outputs,
    ParityBudget,
    accuracy_figures,
    check_accuracy,
    check_parity,
    metrics,
    parity_figures,
)

BASE = {"image_auroc": 0.95, "image_ap": 0.9, "pixel_auroc": 0.97, "pixel_ap": 0.6, "aupro": 0.8}


def _per_class(a: dict, b: dict) -> dict:
    mean = {k: (a[k] + b[k]) / 2 for k in BASE}
    return {"mean": mean, "a": a, "b": b}


def test_one_class_losing_more_than_its_budget_fails_although_the_mean_passes():
    fp32 = _per_class(BASE, BASE)
    int8 = _per_class(dict(BASE, pixel_ap=0.6 + 0.0100), dict(BASE, pixel_ap=0.6 - 0.0156))
    figures = accuracy_figures(fp32, int8)
    assert figures["pixel_ap_drop"] < AccuracyBudget().pixel_ap  # the mean alone would pass
    with pytest.raises(GateError, match=r"class b: pixel_ap dropped 1\.56 pt") as exc:
        check_accuracy(figures, AccuracyBudget(), "piped test")
    assert "class a" not in str(exc.value)


@pytest.mark.parametrize(
    ("key", "drop", "budget"),
    [("image_auroc", 0.011, 0.01), ("aupro", 0.021, 0.02), ("pixel_ap", 0.016, 0.015)],
)
def test_each_metric_has_its_own_budget_per_class(key, drop, budget):
    fp32 = _per_class(BASE, BASE)
    int8 = _per_class(BASE, dict(BASE, **{key: BASE[key] - drop}))
    figures = accuracy_figures(fp32, int8)
    assert getattr(AccuracyBudget(), f"class_{key}") == budget
    with pytest.raises(GateError, match=rf"class b: {key} dropped"):
        check_accuracy(figures, AccuracyBudget(**{key: 1.0}), "set")  # the mean may pass
    # within the class budget (and the mean's): passes
    check_accuracy(figures, AccuracyBudget(**{key: drop, f"class_{key}": drop + 1e-9}), "set")


def test_nan_in_any_class_fails_the_gate():
    fp32 = _per_class(BASE, dict(BASE, aupro=math.nan))
    int8 = _per_class(BASE, BASE)
    with pytest.raises(GateError, match=r"class b: aupro is undefined"):
        check_accuracy(accuracy_figures(fp32, int8), AccuracyBudget(aupro=1.0), "set")


def test_mean_only_figures_still_work_and_nan_mean_fails():
    check_accuracy(accuracy_figures(BASE, BASE), AccuracyBudget(), "set")
    with pytest.raises(GateError, match="image_auroc is undefined"):
        check_accuracy(
            accuracy_figures(BASE, dict(BASE, image_auroc=math.nan)), AccuracyBudget(), "s"
        )


def _evalset(n_per_class: int = 6, size: int = 8) -> EvalSet:
    rng = np.random.default_rng(0)
    classes = ["a"] * n_per_class + ["b"] * n_per_class
    labels = np.array([0, 0, 0, 1, 1, 1] * 2)
    masks = np.zeros((len(classes), size, size), np.uint8)
    masks[labels == 1, 2:5, 2:5] = 1
    images = rng.integers(0, 255, (len(classes), size, size, 3), dtype=np.uint8)
    return EvalSet("tiny", images, classes, labels, masks)


def _outputs(evalset: EvalSet, noise_b: float) -> Outputs:
    rng = np.random.default_rng(1)
    maps = evalset.masks.astype(np.float32) + 0.05 * rng.random(evalset.masks.shape, np.float32)
    is_b = np.asarray(evalset.classes) == "b"
    maps[is_b] += noise_b * rng.random(maps[is_b].shape, np.float32)
    scores = maps.reshape(len(maps), -1).max(1).astype(np.float64)
    return Outputs(maps, scores, {})


def test_gate_from_metrics_of_small_arrays():
    evalset = _evalset()
    ref = metrics(_outputs(evalset, 0.0), evalset)
    same = accuracy_figures(ref, metrics(_outputs(evalset, 0.0), evalset))
    assert {"class.a.pixel_ap_drop", "class.b.aupro_drop", "class.b.image_auroc_drop"} <= set(same)
    check_accuracy(same, AccuracyBudget(), "tiny")
    worse = accuracy_figures(ref, metrics(_outputs(evalset, 3.0), evalset))  # b's maps noisy
    with pytest.raises(GateError, match="class b: ") as exc:
        check_accuracy(worse, AccuracyBudget(), "tiny")
    assert "class a:" not in str(exc.value)


def test_parity_gate_refuses_a_nan_spearman():
    maps = np.zeros((4, 2, 2), np.float32)
    ref = Outputs(maps, np.array([1.0, 2.0, 3.0, 4.0]), {"a": np.ones((1, 2, 2))})
    flat = Outputs(maps, np.full(4, 2.0), {"a": np.ones((1, 2, 2))})  # constant scores
    figures = parity_figures(ref, flat)
    assert math.isnan(figures["score_spearman"])
    with pytest.raises(GateError, match="score_spearman is undefined"):
        check_parity({"openvino": figures}, ParityBudget(score_max_rel=10.0), "export")
    ok = parity_figures(ref, ref)
    check_parity({"openvino": ok}, ParityBudget(), "export")
