"""The runtime's model loader (`lineguard.runtime.engine`) on an exported artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from lineguard.runtime.engine import load_engine
from lineguard.runtime.errors import LineGuardError


def _prompt(artifact, card) -> np.ndarray:
    bgr = cv2.imread(str(artifact / card.prompts[card.classes[0]]))
    return np.ascontiguousarray(bgr[..., ::-1])


def test_engine_runs_without_torch(artifact):
    """A fresh interpreter loads the artifact with both backends and never imports torch."""
    code = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np
        from lineguard.runtime.engine import load_engine
        out = {{}}
        for backend in ("openvino", "onnxruntime"):
            eng = load_engine({str(artifact)!r}, backend=backend, precision="fp32", threads=2)
            h, w = eng.input_size
            img = np.full((h, w, 3), 128, np.uint8)
            tokens = eng.encode_prompt(img)
            amap, score = eng.detect(img, tokens)
            out[backend] = [list(amap.shape), score]
        heavy = sorted(m for m in ("torch", "timm", "sklearn", "nncf") if m in sys.modules)
        print(json.dumps({{"out": out, "heavy": heavy}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    (shape_ov, s_ov), (shape_ort, s_ort) = result["out"]["openvino"], result["out"]["onnxruntime"]
    assert shape_ov == shape_ort
    assert s_ov == pytest.approx(s_ort, rel=1e-4)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_detect_async_matches_detect(artifact, backend):
    eng = load_engine(artifact, backend=backend, async_jobs=2)
    prompt = _prompt(artifact, eng.card)
    tokens = eng.encode_prompt(prompt)
    rng = np.random.default_rng(3)
    frames = [
        np.clip(prompt + rng.normal(0, 20, prompt.shape), 0, 255).astype(np.uint8) for _ in range(5)
    ]
    futures = [eng.detect_async(f, tokens) for f in frames]
    for frame, fut in zip(frames, futures, strict=True):
        amap, score = fut.result(timeout=60)
        ref_map, ref_score = eng.detect(frame, tokens)
        np.testing.assert_array_equal(amap, ref_map)
        assert score == ref_score
    eng.close()


def test_precisions_and_normalisation(artifact):
    fp32 = load_engine(artifact, "openvino", "fp32")
    bf16 = load_engine(artifact, "openvino", "bf16")
    prompt = _prompt(artifact, fp32.card)
    tokens = fp32.encode_prompt(prompt)
    m32, s32 = fp32.detect(prompt, tokens)
    m16, _ = bf16.detect(prompt, tokens)
    span = float(m32.max() - m32.min())
    # bf16 is a different arithmetic (identical only on CPUs without bf16), but the same model
    assert np.abs(m16 - m32).mean() <= 0.03 * span + 1e-6  # ~1 % measured here
    assert np.corrcoef(m16.ravel(), m32.ravel())[0, 1] > 0.99
    norm = fp32.card.score_normalization
    n_map, n_score = fp32.normalize(m32, s32)
    assert n_score == pytest.approx((s32 - norm.image.center) / norm.image.scale)
    np.testing.assert_allclose(n_map, (m32 - norm.pixel.center) / norm.pixel.scale, rtol=1e-5)


def test_prepare_resizes_like_training(artifact):
    eng = load_engine(artifact, "onnxruntime")
    h, w = eng.input_size
    frame = np.random.default_rng(0).integers(0, 256, (3 * h, 2 * w, 3), dtype=np.uint8)
    out = eng.prepare(frame)
    np.testing.assert_array_equal(out, cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA))
    gray = eng.prepare(frame[..., 0])
    assert gray.shape == (h, w, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_loader_errors_name_the_problem(artifact, tmp_path):
    with pytest.raises(LineGuardError, match="unknown backend"):
        load_engine(artifact, backend="tensorrt")
    with pytest.raises(LineGuardError, match="no int8 model"):
        load_engine(artifact, backend="openvino", precision="int8")
    with pytest.raises(LineGuardError, match="fp32 only"):
        load_engine(artifact, backend="onnxruntime", precision="int8")
    eng = load_engine(artifact, backend="onnxruntime")
    h, w = eng.input_size
    with pytest.raises(LineGuardError, match="uint8"):
        eng.detect(np.zeros((h, w, 3), np.float32), np.zeros((1, 4, 4), np.float32))
    with pytest.raises(LineGuardError, match=f"RGB {h}x{w}x3"):
        eng.encode_prompt(np.zeros((h + 1, w, 3), np.uint8))
    tampered = tmp_path / "t"
    shutil.copytree(artifact, tampered)
    with open(tampered / "detector.onnx", "r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\x00" * 16)
    with pytest.raises(LineGuardError, match=r"detector\.onnx does not match its sha256"):
        load_engine(tampered, backend="onnxruntime")


def test_compress_cli_registers_without_heavy_imports():
    code = textwrap.dedent(
        """
        import sys
        from lineguard.runtime.cli import build_parser
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        assert {"export", "quantize"} <= set(sub.choices), sorted(sub.choices)
        heavy = sorted(m for m in ("torch", "openvino", "nncf", "onnx") if m in sys.modules)
        print(heavy)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
