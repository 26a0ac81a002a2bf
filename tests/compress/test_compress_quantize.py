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
from lineguard.compress.schemes import (
    FLOAT_OPS,
    PRESETS,
    SCHEMES,
    backbone_convs,
    ignored_scope,
    resize_matmuls,
)
from lineguard.runtime.artifact import load_card
from lineguard.runtime.engine import load_engine

#: every budget open (mean and per class): for tests of the ladder, not of the gate
OPEN = AccuracyBudget(**dict.fromkeys(AccuracyBudget.model_fields, 1.0))


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
    # INT8 carries its own normalisation, measured on the same normal validation images
    own = int8.score_normalization
    assert own is not None and "INT8" in own.source and own.count == card.score_normalization.count
    assert q.card.score_normalization == own
    assert fp32.card.score_normalization == card.score_normalization
    assert own.image.center != card.score_normalization.image.center
    shift = int8.parity["vs_fp32_image_center_shift"]
    assert shift == pytest.approx(
        (own.image.center - card.score_normalization.image.center)
        / card.score_normalization.image.scale
    )
    # same function up to quantisation noise: strongly correlated maps
    assert np.corrcoef(a8.ravel(), a32.ravel())[0, 1] > 0.9


def _native_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_int8_float_ops_are_recorded_and_honoured(int8_artifact, tmp_path):
    import openvino as ov

    int8 = load_card(int8_artifact).precisions["int8"]
    assert int8.float_ops in ("bf16", "f32")
    assert f"INT8 with its float ops in {int8.float_ops}" in int8.evaluated_on
    native = _native_bf16()
    for ops in ("bf16", "f32"):  # the card's choice, then the other one
        out = tmp_path / ops
        shutil.copytree(int8_artifact, out)
        data = json.loads((out / "model.json").read_text())
        data["precisions"]["int8"]["float_ops"] = ops
        (out / "model.json").write_text(json.dumps(data))
        engine = load_engine(out, "openvino", "int8", verify=False)
        expect = ops if native else "f32"
        assert engine.runner.inference_precision == expect
        compiled = engine.runner._detector.get_property("INFERENCE_PRECISION_HINT")
        assert compiled == getattr(ov.Type, expect)
    assert load_engine(int8_artifact, "openvino", "fp32").runner.inference_precision == "f32"


def _constant_outputs(model):
    """Replace every output by zeros: a model that detects nothing."""
    import openvino as ov

    for result in model.get_results():
        src = result.input_value(0)
        zero = ov.op.Constant(np.zeros(src.get_partial_shape().to_shape(), np.float32))
        result.input(0).replace_source_output(zero.output(0))
    return model


def test_broken_int8_model_is_refused_and_artifact_unchanged(artifact, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = (out / "model.json").read_bytes()
    real = quantize_mod.nncf_quantize

    def quantize_then_break(*args, **kwargs):

        return _constant_outputs(real(*args, **kwargs))

    monkeypatch.setattr(quantize_mod, "nncf_quantize", quantize_then_break)
    with pytest.raises(
        GateError, match=r"(image_auroc|pixel_ap) dropped .* pt .* missed by .* pt"
    ) as err:
        quantize_artifact(QuantizeOptions(artifact=out, calib_images=8))
    for scheme in SCHEMES:  # every rung of the ladder was tried and refused
        for preset in PRESETS:
            for ops in FLOAT_OPS:
                assert f"[{scheme}/{preset}/{ops}] INT8 accuracy gate failed" in str(err.value)
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
            "--max-class-image-auroc-drop",
            "1",
            "--max-class-pixel-ap-drop",
            "1",
            "--max-class-aupro-drop",
            "1",
        ]
    )
    assert rc == 0
    card = json.loads((out / "model.json").read_text())
    assert "labelled test split" in card["precisions"]["int8"]["evaluated_on"]
    assert card["precisions"]["int8"]["budgets"]["max_image_auroc_drop"] == 1.0
    assert card["precisions"]["int8"]["budgets"]["max_class_image_auroc_drop"] == 1.0


def _fake_quantize_count(xml) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())


def test_ladder_keeps_the_first_scheme_that_passes(artifact, int8_artifact, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    real = quantize_mod.check_accuracy
    calls = []

    def refuse_full(figures, budget, evaluated_on):
        calls.append(figures)
        if len(calls) <= 4:  # both presets x both float-ops precisions of the full scheme
            raise GateError("refused for the test")
        real(figures, OPEN, evaluated_on)

    monkeypatch.setattr(quantize_mod, "check_accuracy", refuse_full)
    quantize_artifact(QuantizeOptions(artifact=out, calib_images=8))
    assert len(calls) == 5
    int8 = load_card(out, verify=True).precisions["int8"]
    assert "performance preset, scheme float-stem, float ops bf16" in int8.method
    tried = "full/performance/bf16, full/performance/f32, full/mixed/bf16, full/mixed/f32"
    assert f"tried: {tried}" in int8.method
    assert int8.float_ops == "bf16"
    assert int8.accuracy == pytest.approx({k: v for k, v in calls[4].items()})
    # the kept model really is the float-stem one: fewer quantizers than the full scheme's
    full = load_card(int8_artifact).precisions["int8"]
    assert "scheme full" in full.method
    assert _fake_quantize_count(out / INT8_DETECTOR) < _fake_quantize_count(
        int8_artifact / INT8_DETECTOR
    )


def test_float_ops_fallback_keeps_the_same_int8_model(artifact, tmp_path, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    real = quantize_mod.check_accuracy
    quantized = []
    real_nncf = quantize_mod.nncf_quantize
    monkeypatch.setattr(
        quantize_mod, "nncf_quantize", lambda *a, **k: quantized.append(a) or real_nncf(*a, **k)
    )
    calls = []

    def refuse_bf16(figures, budget, evaluated_on):
        calls.append(figures)
        if len(calls) == 1:
            raise GateError("refused for the test")
        real(figures, OPEN, evaluated_on)

    monkeypatch.setattr(quantize_mod, "check_accuracy", refuse_bf16)
    quantize_artifact(QuantizeOptions(artifact=out, calib_images=8))
    int8 = load_card(out, verify=True).precisions["int8"]
    assert len(quantized) == 1  # the f32 retry is a compile hint, not a second NNCF run
    assert int8.float_ops == "f32" and "tried: full/performance/bf16" in int8.method
    assert "INT8 with its float ops in f32" in int8.evaluated_on


def test_ladder_order_and_pins():
    def ladder(**kw):
        return quantize_mod.rungs(QuantizeOptions(artifact="a", **kw))

    first = [("full", "performance"), ("full", "mixed"), ("float-stem", "performance")]
    assert ladder()[:3] == first
    assert len(ladder()) == 6
    assert ladder(scheme="float-stem") == [("float-stem", "performance"), ("float-stem", "mixed")]
    assert ladder(preset="mixed") == [(s, "mixed") for s in SCHEMES]
    assert ladder(accuracy_control=True) == [("full", "performance"), ("full", "mixed")]


def test_schemes_select_backbone_convolutions(artifact):
    import openvino as ov

    model = ov.Core().read_model(str(artifact / "detector.xml"))
    convs = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "GroupConvolution")
    ]
    backbone = backbone_convs(model)
    size = model.input("image").get_partial_shape()[1].get_length()
    # the refiner has two 3x3 convs and the 1x1 predictor; everything else is the backbone
    assert len(convs) - len(backbone) == 3
    # every scheme keeps the maps' resize float: R·x·Rᵀ for S_rec and for the refiner logit
    resize = set(resize_matmuls(model))
    assert len(resize) == 4
    for op in model.get_ordered_ops():
        if op.get_friendly_name() in resize:
            dims = [int(d) for d in op.get_output_partial_shape(0).to_shape()]
            assert op.get_type_name() == "MatMul" and size in dims[-2:]
    assert set(ignored_scope(model, "full").names) == resize
    stem = set(ignored_scope(model, "float-stem").names) - resize
    by_name = {op.get_friendly_name(): op for op in backbone}
    assert stem and all(
        by_name[n].get_output_partial_shape(0)[2].get_length() == size // 2 for n in stem
    )
    whole = ignored_scope(model, "float-backbone")
    assert set(whole.names) == set(by_name) | resize and "Interpolate" in whole.types
