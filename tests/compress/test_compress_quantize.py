"""Quantize: the INT8 artifact loads, runs and is smaller; a broken INT8 model is refused."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest

from lineguard.compress import quantize as quantize_mod
from lineguard.compress.gates import AccuracyBudget, GateError, accuracy_figures, check_accuracy
from lineguard.compress.quantize import INT8_DETECTOR, QuantizeOptions, quantize_artifact
from lineguard.runtime.artifact import load_card
from lineguard.runtime.engine import load_engine


def test_int8_artifact_loads_runs_and_is_smaller(int8_artifact):
    card = load_card(int8_artifact, verify=True)  # every file, INT8 ones included, hashed
    int8 = card.precisions["int8"]
    assert int8.files["detector"] == INT8_DETECTOR
    assert int8.files["prompt_encoder"] == card.precisions["fp32"].files["prompt_encoder"]
    assert "never test images" in int8.calibrated_on
    for key in ("image_auroc", "pixel_ap"):
        assert int8.accuracy[f"{key}_drop"] == pytest.approx(
            int8.accuracy[f"fp32_{key}"] - int8.accuracy[f"int8_{key}"]
        )
    fp32_size = (int8_artifact / "detector.bin").stat().st_size
    int8_size = (int8_artifact / "detector_int8.bin").stat().st_size
    assert int8_size < 0.6 * fp32_size
    fp32 = load_engine(int8_artifact, "openvino", "fp32")
    q = load_engine(int8_artifact, "openvino", "int8")
    bgr = cv2.imread(str(int8_artifact / card.prompts[card.classes[0]]))
    prompt = np.ascontiguousarray(bgr[..., ::-1])
    tokens = q.encode_prompt(prompt)
    a32, _ = fp32.detect(prompt, tokens)
    a8, s8 = q.detect(prompt, tokens)
    assert a8.shape == a32.shape and np.isfinite(a8).all() and math.isfinite(s8)
    assert not np.array_equal(a8, a32)  # it really is another model
    # same function up to quantisation noise: strongly correlated maps
    assert np.corrcoef(a8.ravel(), a32.ravel())[0, 1] > 0.9


def test_broken_int8_model_is_refused_and_artifact_unchanged(artifact, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = (out / "model.json").read_bytes()
    real = quantize_mod.nncf_quantize

    def quantize_then_break(*args, **kwargs):
        import openvino as ov

        model = real(*args, **kwargs)
        for result in model.get_results():  # constant outputs: a model that detects nothing
            src = result.input_value(0)
            zero = ov.op.Constant(np.zeros(src.get_partial_shape().to_shape(), np.float32))
            result.input(0).replace_source_output(zero.output(0))
        return model

    monkeypatch.setattr(quantize_mod, "nncf_quantize", quantize_then_break)
    with pytest.raises(GateError, match=r"image_auroc dropped .* pt .* missed by .* pt"):
        quantize_artifact(QuantizeOptions(artifact=out, calib_images=8))
    assert (out / "model.json").read_bytes() == before
    assert not list(out.glob("*int8*")) and not (out / ".int8-staging").exists()
    assert "int8" not in load_card(out).precisions


def test_accuracy_gate_budgets():
    fp32 = {
        "image_auroc": 0.95,
        "image_ap": 0.9,
        "pixel_auroc": 0.97,
        "pixel_ap": 0.60,
        "aupro": 0.8,
    }
    ok = dict(fp32, image_auroc=0.946, pixel_ap=0.592)
    check_accuracy(accuracy_figures(fp32, ok), AccuracyBudget(), "set")
    bad = dict(fp32, pixel_ap=0.57)
    with pytest.raises(
        GateError, match=r"pixel_ap dropped 3\.00 pt .* budget 1\.00 pt, missed by 2\.00 pt"
    ):
        check_accuracy(accuracy_figures(fp32, bad), AccuracyBudget(), "set")
    undefined = dict(fp32, image_auroc=math.nan)
    with pytest.raises(GateError, match="image_auroc is undefined"):
        check_accuracy(accuracy_figures(fp32, undefined), AccuracyBudget(), "set")


def test_quantize_cli_adds_int8_with_labelled_gate(artifact, dataset, tmp_path):
    from lineguard.runtime.cli import main

    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    rc = main(
        [
            "quantize",
            "--artifact",
            str(out),
            "--labelled",
            str(dataset),
            "--calib-images",
            "8",
            "--max-image-auroc-drop",
            "1",
            "--max-pixel-ap-drop",
            "1",
        ]
    )
    assert rc == 0
    card = json.loads((out / "model.json").read_text())
    assert "labelled test split" in card["precisions"]["int8"]["evaluated_on"]
    assert card["precisions"]["int8"]["budgets"]["max_image_auroc_drop"] == 1.0
