"""Export: graphs reproduce PyTorch, the parity gate refuses broken graphs, model.json is sound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import torch

from lineguard.compress import export as export_mod
from lineguard.compress.card import SCHEMA_PATH, model_schema
from lineguard.compress.checkpoint import load_checkpoint
from lineguard.compress.evalsets import parity_set, try_normal_data
from lineguard.compress.export import ExportOptions, export_artifact
from lineguard.compress.gates import (
    GateError,
    ParityBudget,
    check_parity,
    parity_figures,
    run_graphs,
    run_torch,
)
from lineguard.compress.graphs import to_model_input
from lineguard.runtime.artifact import load_card, sha256_file
from lineguard.runtime.engine import OpenVINORunner, load_engine
from lineguard.runtime.errors import LineGuardError


def _frames(n: int, size: int, seed: int) -> np.ndarray:
    """Random-ish RGB frames not seen by the gate (smooth blobs + noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    up = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_CUBIC) for x in low])
    return np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_graphs_match_pytorch(artifact, checkpoint, backend):
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    engine = load_engine(artifact, backend=backend, precision="fp32", threads=2)
    frames = _frames(4, ckpt.input_size, seed=7)
    prompt = ckpt.prompts[ckpt.classes[0]]
    with torch.no_grad():
        ref_tok = model.encode_prompt(to_model_input(torch.from_numpy(prompt[None])))
        ref_map, ref_score = model.detect(to_model_input(torch.from_numpy(frames)), ref_tok)
    tokens = engine.encode_prompt(prompt)
    assert tokens.shape == tuple(ref_tok.shape)
    np.testing.assert_allclose(tokens, ref_tok.numpy(), rtol=1e-4, atol=1e-4)
    span = float(ref_map.max() - ref_map.min())
    for i, frame in enumerate(frames):
        amap, score = engine.detect(frame, tokens)
        assert amap.shape == (ckpt.input_size, ckpt.input_size) and amap.dtype == np.float32
        assert np.abs(amap - ref_map[i, 0].numpy()).max() <= 1e-4 * span
        assert score == pytest.approx(float(ref_score[i]), rel=1e-4)


def test_model_json_validates_and_describes_the_artifact(artifact, checkpoint):
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema == model_schema(), "schemas/model.schema.json is stale: run card.write_schema()"
    raw = json.loads((artifact / "model.json").read_text())
    jsonschema.validate(raw, schema)
    card = load_card(artifact, verify=True)
    ckpt = load_checkpoint(checkpoint)
    files = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert set(card.sha256) == files - {"model.json"}
    assert card.checkpoint_sha256 == sha256_file(checkpoint)
    assert card.input_size == [ckpt.input_size] * 2 and card.color_order == "RGB"
    assert card.resize == "cv2-area" and card.layout == "NHWC"
    assert card.classes == ckpt.classes
    # the training images' file keys travel into model.json (calibration warns about them)
    assert card.trained_file_keys == ckpt.trained_file_keys and len(card.trained_file_keys) > 0
    assert card.score_normalization.image.center == pytest.approx(
        ckpt.calibration["image"]["center"]
    )
    assert card.score_normalization.pixel.scale == pytest.approx(ckpt.calibration["pixel"]["scale"])
    for cls, rel in card.prompts.items():
        png = cv2.cvtColor(cv2.imread(str(artifact / rel)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(png, ckpt.prompts[cls])
    fp32 = card.precisions["fp32"]
    for key in ("map_max_rel", "map_mean_rel", "score_max_rel", "tokens_max_rel"):
        for backend in ("onnxruntime", "openvino"):
            assert 0 <= fp32.parity[f"{backend}_{key}"] <= fp32.budgets[f"parity_{key}"]
    assert [t.name for t in card.detector.inputs] == ["image", "prompt_tokens"]
    assert [t.name for t in card.detector.outputs] == ["anomaly_map", "image_score"]


def _perturb_bin(xml: Path) -> None:
    """Scale the largest float constant of an IR by 1.5 (a 'corrupted' weight tensor)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    consts = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f32
    ]
    biggest = max(consts, key=lambda c: int(np.prod(c.get_output_shape(0))))
    scaled = ov.op.Constant(np.ascontiguousarray(biggest.get_data() * np.float32(1.5)))
    for target in list(biggest.output(0).get_target_inputs()):
        target.replace_source_output(scaled.output(0))
    tmp = xml.with_name("corrupt.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)  # not over the mmapped original
    del model, consts, biggest
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))


def test_parity_gate_refuses_a_broken_graph(artifact, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    _perturb_bin(broken / "detector.xml")
    ckpt = load_checkpoint(checkpoint)
    evalset = parity_set(ckpt, try_normal_data(ckpt, None))
    ref = run_torch(ckpt.build_model(), evalset, ckpt.prompts)
    good = OpenVINORunner(artifact / "prompt_encoder.xml", artifact / "detector.xml", "fp32")
    bad = OpenVINORunner(broken / "prompt_encoder.xml", broken / "detector.xml", "fp32")
    figures = {"openvino": parity_figures(ref, run_graphs(good, evalset, ckpt.prompts))}
    check_parity(figures, ParityBudget(), "test")  # the intact graph passes
    figures["openvino"] = parity_figures(ref, run_graphs(bad, evalset, ckpt.prompts))
    with pytest.raises(GateError, match=r"openvino map_max_rel = .* > 1\.0e-03 \(.*x the budget\)"):
        check_parity(figures, ParityBudget(), "test")


def test_failed_gate_writes_no_artifact(checkpoint, tmp_path, monkeypatch):
    convert = export_mod.onnx_to_openvino

    def convert_and_corrupt(onnx_path, xml_path):
        convert(onnx_path, xml_path)
        if xml_path.name == "detector.xml":
            _perturb_bin(xml_path)
        return xml_path

    monkeypatch.setattr(export_mod, "onnx_to_openvino", convert_and_corrupt)
    out = tmp_path / "art"
    with pytest.raises(GateError) as err:
        export_artifact(ExportOptions(checkpoint=checkpoint, out=out))
    assert "openvino map_max_rel" in str(err.value)
    assert "onnxruntime" not in str(err.value)  # the ONNX graph itself was fine
    assert not (out / "model.json").exists()
    assert not list(out.glob("*.xml")) and not list(out.glob("*.onnx"))


def test_export_refuses_other_size_and_occupied_folder(checkpoint, artifact, tmp_path):
    with pytest.raises(LineGuardError, match="trained at 64 px"):
        export_artifact(ExportOptions(checkpoint=checkpoint, out=tmp_path / "a", size=96))
    with pytest.raises(LineGuardError, match="not empty; pass --force"):
        export_artifact(ExportOptions(checkpoint=checkpoint, out=artifact))
    assert (artifact / "model.json").is_file()  # untouched


def test_gate_sets_from_checkpoint_alone_and_from_validation(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    alone = parity_set(ckpt, None)  # no training data at hand: golden prompts + defects
    assert "golden prompts" in alone.description
    n = len(ckpt.classes)
    assert len(alone) == 4 * n and alone.labels[:n].sum() == 0 and alone.labels[n:].all()
    for i in range(n, len(alone)):  # pixels outside the mask are the prompt's, untouched
        base = ckpt.prompts[alone.classes[i]]
        outside = alone.masks[i] == 0
        np.testing.assert_array_equal(alone.images[i][outside], base[outside])
        assert (alone.images[i][~outside] != base[~outside]).any()
    from lineguard.compress.evalsets import normal_data, validation_set

    td = normal_data(ckpt)
    val = validation_set(ckpt, td, defects=3)
    assert len(val) == 4 * len(td.val_images)
    assert (val.labels == 0).sum() == len(td.val_images)
    assert "never" not in val.description and "validation" in val.description


def test_map_smoothing_travels_into_the_exported_detector(checkpoint, tmp_path):
    """A checkpoint whose map smoothing was chosen (σ 2) exports a detector that smooths alike."""
    raw = torch.load(checkpoint, map_location="cpu", weights_only=False)
    raw["model_config"] = {**raw["model_config"], "map_blur_sigma": 2.0}
    blurred = tmp_path / "blurred.pt"
    torch.save(raw, blurred)
    art = tmp_path / "art"
    export_artifact(ExportOptions(checkpoint=blurred, out=art, force=True))
    ckpt = load_checkpoint(blurred)
    model = ckpt.build_model()
    assert model.blur_matrix is not None
    engine = load_engine(art, backend="onnxruntime", precision="fp32", threads=2)
    frame = _frames(1, ckpt.input_size, seed=3)
    prompt = ckpt.prompts[ckpt.classes[0]]
    with torch.no_grad():
        tok = model.encode_prompt(to_model_input(torch.from_numpy(prompt[None])))
        ref_map, _ = model.detect(to_model_input(torch.from_numpy(frame)), tok)
        model.set_map_blur(0.0)
        sharp, _ = model.detect(to_model_input(torch.from_numpy(frame)), tok)
    amap, _ = engine.detect(frame[0], engine.encode_prompt(prompt))
    span = float(ref_map.max() - ref_map.min())
    assert np.abs(amap - ref_map[0, 0].numpy()).max() <= 1e-4 * span
    # and the smoothing really happened: the blurred map is flatter than the sharp one
    assert float(ref_map.std()) < float(sharp.std())


@pytest.mark.parametrize("zoom", [1, 2])
def test_prompt_match_travels_into_the_exported_graphs(checkpoint, tmp_path, zoom, open_budget):
    """A checkpoint that fuses the prompt match (at either zoom) exports graphs whose tokens
    carry the golden sample's descriptors and whose map equals PyTorch's, batched per tile too;
    the zoomed detector quantizes to INT8."""
    raw = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # radius 1 (3×3 window per zoom step): the exporters unroll the window, so a smaller one
    # exports the same ops in a fraction of the time
    cfg = {"match_weight": 0.5, "match_zoom": zoom, "match_radius": 1}
    raw["model_config"] = {**raw["model_config"], **cfg}
    raw["state_dict"] = {**raw["state_dict"], "match_scale": torch.tensor(3.0)}
    matched = tmp_path / "matched.pt"
    torch.save(raw, matched)
    art = tmp_path / "art"
    export_artifact(ExportOptions(checkpoint=matched, out=art, force=True, dynamic_batch=True))
    ckpt = load_checkpoint(matched)
    model = ckpt.build_model()
    card = load_card(art)
    assert card.detector.inputs[1].shape[1] == model.prompt_token_count
    assert model.prompt_token_count > model.grid**2
    frames = _frames(3, ckpt.input_size, seed=5)
    prompts = np.stack([ckpt.prompts[c] for c in ckpt.classes] * 3)[:3]
    with torch.no_grad():
        tok = model.encode_prompt(to_model_input(torch.from_numpy(prompts)))
        ref_map, ref_score = model.detect(to_model_input(torch.from_numpy(frames)), tok)
        parts = model.detect_parts(to_model_input(torch.from_numpy(frames)), tok)
    assert parts[2] is not None and float(parts[2].abs().max()) > 0
    span = float(ref_map.max() - ref_map.min())
    for backend in ("onnxruntime", "openvino"):
        engine = load_engine(art, backend=backend, precision="fp32", threads=2)
        tokens = np.concatenate([engine.encode_prompt(p) for p in prompts])
        np.testing.assert_allclose(tokens, tok.numpy(), rtol=1e-4, atol=1e-4)
        maps, scores = engine.detect_batch(frames, tokens)  # each tile its own prompt
        assert np.abs(maps - ref_map[:, 0].numpy()).max() <= 1e-4 * span, backend
        np.testing.assert_allclose(scores, ref_score.numpy(), rtol=1e-4)
    if zoom == 1:
        return  # INT8 of the plain graph: tests/compress/test_compress_quantize.py
    # the zoomed match resizes the input inside the graph: NNCF must still quantize it
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact

    quantize_artifact(
        QuantizeOptions(
            artifact=art,
            calib_images=8,
            gate_per_class=2,
            gate_defects=1,
            scheme="full",
            preset="performance",
            float_ops="f32",
            budget=open_budget,
        )
    )
    engine = load_engine(art, backend="openvino", precision="int8", threads=2)
    maps, _ = engine.detect_batch(frames, tokens)
    assert maps.shape == (3, ckpt.input_size, ckpt.input_size) and np.isfinite(maps).all()
