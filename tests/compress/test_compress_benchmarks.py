"""The compress benchmarks run end to end on the tiny artifact (tiny settings, no timing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lineguard.compress.checkpoint import load_checkpoint
from lineguard.compress.export import export_graphs
from lineguard.compress.graphs import PromptEncoderGraph

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_latency_rows(int8_artifact, tmp_path):
    bench = _load("edge_latency")
    args = ["--artifact", str(int8_artifact), "--rounds", "1", "--per-round", "2"]
    bench.main([*args, "--warmup", "1", "--pause", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "edge_latency.json").read_text())
    assert result["threads"] == 2 and result["cpu"]
    rows = {(r["engine"], r["scope"]): r for r in result["rows"]}
    required = {(e, s) for e in bench.ENGINES for s in ("detector", "end_to_end")}
    card = json.loads((int8_artifact / "model.json").read_text())
    other = "bf16" if card["precisions"]["int8"]["float_ops"] == "f32" else "f32"
    extra = {(f"openvino-int8-{other}-float-ops", s) for s in ("detector", "end_to_end")}
    assert set(rows) == required | extra
    for r in rows.values():
        assert r["input_size"] == 64
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["fps"] > 0 and r["size_mb"] > 0
    assert (
        rows[("openvino-int8", "detector")]["size_mb"]
        < rows[("openvino-fp32", "detector")]["size_mb"]
    )
    assert set(result["speedups"]["64"]) == {
        "int8_vs_pytorch",
        "int8_vs_openvino_f32",
        "bf16_vs_openvino_f32",
        f"int8-{other}-float-ops_vs_openvino_f32",
        f"int8-{other}-float-ops_vs_pytorch",
    }
    assert (tmp_path / "edge_latency.md").read_text().startswith("# Edge latency")


def test_compress_eval_reports_fp32_and_int8(int8_artifact, checkpoint, dataset, tmp_path):
    bench = _load("compress_eval")
    args = ["--checkpoint", str(checkpoint), "--dataset", str(dataset), "--name", "tiny"]
    result = bench.main([*args, "--artifact", str(int8_artifact), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "compress_tiny.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["test_images"] == 16  # 2 classes x (3 good + 5 defective)
    keys = {"image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"}
    for prec in ("fp32", "int8"):
        assert set(saved[prec]["mean"]) == keys
        assert all(0.0 <= v <= 1.0 for v in saved[prec]["mean"].values())
    assert set(saved["per_class"]) == {"disc", "stripe"}
    other = saved["int8_other_float_ops"]
    kept = json.loads((int8_artifact / "model.json").read_text())["precisions"]["int8"]
    assert {other["float_ops"], kept["float_ops"]} == {"bf16", "f32"}
    assert set(other["mean"]) == keys and other["vs_int8_on_test"]["map_mean_rel"] >= 0
    for k in keys:
        assert np.isclose(saved["drop"][k], saved["fp32"]["mean"][k] - saved["int8"]["mean"][k])
    assert "never test images" in saved["gate"]["int8_calibrated_on"]
    assert "FP32 vs INT8" in (tmp_path / "compress_tiny.md").read_text()


def test_compress_eval_records_a_gate_refusal(int8_artifact, checkpoint, dataset, tmp_path):
    """No rung passed: the result says FP32 ships, lists each rung's refusal, scores FP32."""
    bench = _load("compress_eval")
    args = bench.argparse.Namespace(
        checkpoint=checkpoint, dataset=dataset, name="tiny", threads=1, artifact=None
    )
    why = "[full/performance/bf16] image_auroc dropped | [float-stem/mixed/f32] class a dropped"
    result = bench.refusal(args, int8_artifact, why + " — artifact left unchanged (FP32 only)")
    assert result["shipped"] == "fp32" and result["int8"] is None
    assert result["gate_refused"] == [
        "[full/performance/bf16] image_auroc dropped",
        "[float-stem/mixed/f32] class a dropped",
    ]
    assert all(0.0 <= v <= 1.0 for v in result["fp32"]["mean"].values())
    assert set(result["per_class"]) == {"disc", "stripe"}
    text = bench.refusal_markdown(result)
    assert "refused every rung" in text and "(2 tried)" in text


def test_dynamic_batch_export(checkpoint, tmp_path):
    model = load_checkpoint(checkpoint).build_model()
    export_graphs(model, tmp_path, dynamic_batch=True)
    s = model.cfg.input_size
    images = torch.randint(0, 256, (3, s, s, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = PromptEncoderGraph(model)(images).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    enc = ort.InferenceSession(str(tmp_path / "prompt_encoder.onnx"), opts)
    (tokens,) = enc.run(None, {"image": images.numpy()})
    np.testing.assert_allclose(tokens, ref, rtol=1e-4, atol=1e-4)
    det = ort.InferenceSession(str(tmp_path / "detector.onnx"), opts)
    amap, score = det.run(None, {"image": images.numpy(), "prompt_tokens": tokens})
    assert amap.shape == (3, 1, s, s) and score.shape == (3,)
    # tiled stations: every tile against its own tokens in ONE call, on both backends, equal to
    # one call per tile
    from lineguard.runtime.engine import OnnxRuntimeRunner, OpenVINORunner

    rgb = images.numpy()
    for runner in (
        OnnxRuntimeRunner(tmp_path / "prompt_encoder.onnx", tmp_path / "detector.onnx"),
        OpenVINORunner(tmp_path / "prompt_encoder.xml", tmp_path / "detector.xml", "fp32"),
    ):
        assert runner.batch_images and runner.batch_tokens
        toks = np.concatenate([runner.encode_prompt(rgb[i]) for i in range(3)])
        maps, scores = runner.detect_batch(rgb, toks)
        assert maps.shape == (3, s, s) and scores.shape == (3,)
        for i in range(3):
            m, sc = runner.detect(rgb[i], toks[i : i + 1])
            np.testing.assert_allclose(maps[i], m, rtol=1e-4, atol=1e-5)
            assert np.isclose(scores[i], sc, rtol=1e-4, atol=1e-5)
        shared_maps, _ = runner.detect_batch(rgb, toks[:1])  # one prompt for every tile
        np.testing.assert_allclose(shared_maps[0], maps[0], rtol=1e-4, atol=1e-5)
        runner.close()
