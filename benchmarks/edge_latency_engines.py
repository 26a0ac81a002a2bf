"""The engines edge_latency.py times: a random-head or real artifact, and each runtime's detect.

Why a module of its own: building the model (export, NNCF and ONNX Runtime INT8) and wrapping
PyTorch, ONNX Runtime and OpenVINO behind one `detect(rgb)` is the setup of the benchmark;
edge_latency.py only times those calls and reports them (edge_latency_tiled.py reuses
`synthetic_frames` and `file_mb`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np


def synthetic_frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random scenes with sensor noise (RGB uint8), for calibration and timing."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        low = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
        up = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        out[i] = np.clip(up + rng.normal(0, 4, up.shape), 0, 255).astype(np.uint8)
    return out


def file_mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for p in paths) / 1e6, 2)


def build_random(
    size: int,
    work: Path,
    threads: int,
    calib: int,
    extra_schemes: list[str],
    extra_presets: list[str] = (),
) -> dict:
    """Export + INT8-quantize a random-head lite2 OneNIP at `size` into `work`.

    `openvino-int8` is what `lineguard quantize` tries first (`full` scheme, `performance`
    preset); each of `extra_schemes` (e.g. float-stem) adds a row `openvino-int8-<scheme>`, the
    price of the safer rungs of the quantize ladder, and each of `extra_presets` (e.g. mixed) a
    row `openvino-int8-<preset>`.
    """
    import torch

    from lineguard.compress.export import export_graphs
    from lineguard.compress.quantize import INT8_DETECTOR, nncf_quantize
    from lineguard.runtime.engine import OpenVINORunner
    from lineguard.train.torch_model import OneNIP, OneNIPConfig

    torch.manual_seed(0)
    model = OneNIP(OneNIPConfig(input_size=size), pretrained=True).eval()
    work.mkdir(parents=True, exist_ok=True)
    export_graphs(model, work, dynamic_batch=False)
    fp32 = OpenVINORunner(work / "prompt_encoder.xml", work / "detector.xml", "fp32", threads)
    frames = synthetic_frames(calib + 1, size, size, seed=1)
    tokens = fp32.encode_prompt(frames[0])
    items = [{"image": f[None], "prompt_tokens": tokens} for f in frames[1:]]
    import openvino as ov

    int8 = nncf_quantize(work / "detector.xml", items)
    ov.save_model(int8, str(work / INT8_DETECTOR), compress_to_fp16=False)
    ort_int8 = onnxruntime_int8(work, items)
    extra = {}
    for scheme in extra_schemes:
        path = work / f"detector_int8_{scheme}.xml"
        quantized = nncf_quantize(work / "detector.xml", items, scheme=scheme)
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        extra[scheme] = path
    for preset in extra_presets:
        path = work / f"detector_int8_{preset}.xml"
        quantized = nncf_quantize(work / "detector.xml", items, preset=preset)
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        extra[preset] = path
    torch.save(model.state_dict(), work / "state_dict.pt")
    return {
        "model": model,
        "dir": work,
        "int8": work / INT8_DETECTOR,
        "int8_extra": extra,
        "ort_int8": ort_int8,
        "prompt": frames[0],
        "float_ops": "bf16",  # what `lineguard quantize` tries first
        "norm": (0.0, 1.0, 0.0, 1.0),
        "thresholds": (1.0, 1.0),
    }


def int8_runners(built: dict, threads: int) -> dict[str, tuple[object, float]]:
    """The INT8 IR with its own float-ops hint, and with the other one."""
    from lineguard.runtime.engine import OpenVINORunner

    d: Path = built["dir"]
    mb = file_mb(
        d / "prompt_encoder.xml",
        d / "prompt_encoder.bin",
        built["int8"],
        built["int8"].with_suffix(".bin"),
    )
    ops = built["float_ops"]
    other = "f32" if ops == "bf16" else "bf16"
    return {
        name: (
            OpenVINORunner(d / "prompt_encoder.xml", built["int8"], "int8", threads, float_ops=f),
            mb,
        )
        for name, f in (("openvino-int8", ops), (f"openvino-int8-{other}-float-ops", other))
    }


def onnxruntime_int8(work: Path, items: list[dict]) -> Path:
    """ONNX Runtime's own static INT8 (QDQ, per-channel weights) of the detector, to answer
    whether an ONNX Runtime INT8 path would be competitive with OpenVINO's."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    pre, out = work / "detector_ort_pre.onnx", work / "detector_ort_int8.onnx"
    quant_pre_process(str(work / "detector.onnx"), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    return out


def shipped(card) -> str:
    """What a station runs by default: the INT8 rung its gate kept (the ladder's method text),
    else FP32 (no INT8 in the artifact: none made, or every rung refused)."""
    if "int8" in card.precisions:
        return f"int8: {card.precisions['int8'].method.split('; tried')[0]}"
    return "fp32: the artifact has no INT8 model"


def from_artifact(artifact: Path) -> dict:
    """A real artifact and the PyTorch model of its checkpoint; its INT8 engines only where it
    has an INT8 model."""
    import torch

    from lineguard.compress.checkpoint import load_checkpoint
    from lineguard.runtime.artifact import load_card

    card = load_card(artifact)
    int8 = card.precisions.get("int8")
    ckpt = load_checkpoint(card.checkpoint)
    model = ckpt.build_model()
    state = Path(tempfile.mkdtemp(prefix="lat-")) / "state_dict.pt"
    torch.save(model.state_dict(), state)
    n = card.score_normalization
    bgr = cv2.imread(str(artifact / card.prompts[card.classes[0]]))
    return {
        "model": model,
        "dir": artifact,
        "int8": artifact / int8.files["detector"] if int8 else None,
        "prompt": np.ascontiguousarray(bgr[..., ::-1]),
        "float_ops": int8.float_ops if int8 else None,
        "shipped": shipped(card),
        "state": state,
        "norm": (n.image.center, n.image.scale, n.pixel.center, n.pixel.scale),
        "thresholds": (card.thresholds.image, card.thresholds.pixel),
    }


def engines(built: dict, threads: int) -> dict[str, tuple[Callable, float]]:
    """name -> (detect(rgb) -> (map, score), size_mb)."""
    import torch

    from lineguard.compress.graphs import to_model_input
    from lineguard.runtime.engine import OnnxRuntimeRunner, OpenVINORunner

    torch.set_num_threads(threads)
    d: Path = built["dir"]
    model = built["model"]
    prompt = built["prompt"]
    with torch.inference_mode():
        t_tokens = model.encode_prompt(to_model_input(torch.from_numpy(prompt[None])))

    def torch_detect(rgb: np.ndarray) -> tuple[np.ndarray, float]:
        with torch.inference_mode():
            amap, score = model.detect(to_model_input(torch.from_numpy(rgb[None])), t_tokens)
        return amap[0, 0].numpy(), float(score[0])

    runners = {
        "onnxruntime-fp32": (
            OnnxRuntimeRunner(d / "prompt_encoder.onnx", d / "detector.onnx", threads=threads),
            file_mb(d / "prompt_encoder.onnx", d / "detector.onnx"),
        ),
        "openvino-fp32": (
            OpenVINORunner(d / "prompt_encoder.xml", d / "detector.xml", "fp32", threads),
            file_mb(
                *[d / f"{g}.{e}" for g in ("prompt_encoder", "detector") for e in ("xml", "bin")]
            ),
        ),
        "openvino-bf16": (
            OpenVINORunner(d / "prompt_encoder.xml", d / "detector.xml", "bf16", threads),
            file_mb(
                *[d / f"{g}.{e}" for g in ("prompt_encoder", "detector") for e in ("xml", "bin")]
            ),
        ),
    }
    if built["int8"] is not None:
        runners.update(int8_runners(built, threads))
    if built.get("ort_int8") is not None:
        runners["onnxruntime-int8"] = (
            OnnxRuntimeRunner(d / "prompt_encoder.onnx", built["ort_int8"], threads=threads),
            file_mb(d / "prompt_encoder.onnx", built["ort_int8"]),
        )
    for scheme, xml in built.get("int8_extra", {}).items():
        runners[f"openvino-int8-{scheme}"] = (
            OpenVINORunner(
                d / "prompt_encoder.xml", xml, "int8", threads, float_ops=built["float_ops"]
            ),
            file_mb(
                d / "prompt_encoder.xml", d / "prompt_encoder.bin", xml, xml.with_suffix(".bin")
            ),
        )
    state = built.get("state", d / "state_dict.pt")
    out: dict[str, tuple[Callable, float]] = {"pytorch-fp32": (torch_detect, file_mb(state))}
    for name, (runner, mb) in runners.items():
        tokens = runner.encode_prompt(prompt)
        out[name] = ((lambda r, t: lambda rgb: r.detect(rgb, t))(runner, tokens), mb)
    return out
