"""Helpers for the calibration tests: a tiny but real model artifact, images, station files.

The artifact's graphs are real ONNX (built with onnx.helper, no torch) run by the real engine
(`load_engine`, ONNX Runtime): the prompt encoder turns the golden image into per-pixel tokens,
the detector's anomaly map is the 3×3-smoothed mean absolute colour difference to the prompt and
its image score the map's maximum. That is the fixed-prompt contract of the real model, with a
"model" simple enough that normal images (the pattern plus noise) score low and images with a
painted blob score high.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from lineguard.runtime.artifact import (
    GraphSpec,
    ModelCard,
    Normalization,
    Precision,
    ScoreNormalization,
    TensorSpec,
    Thresholds,
    sha256_file,
    write_card,
)

SIZE = 32
SCALE = 8.0  # raw map units (grey levels) per normalised unit
LINEGUARD = str(Path(sys.executable).parent / "lineguard")
LOW = "{image: 0.001, pixel: 0.001, min_area_px: 4}"  # every frame alerts (lowest allowed)
HIGH = "{image: 100.0, pixel: 100.0, min_area_px: 4}"  # nothing alerts


def _graphs(out: Path, size: int, dynamic_batch: bool = False) -> None:
    import onnx
    from onnx import TensorProto, helper

    n = size * size
    b, lead = ("batch", -1) if dynamic_batch else (1, 1)  # -1: Reshape keeps the batch
    tok_shape = helper.make_tensor("tok_shape", TensorProto.INT64, [3], [lead, n, 3])
    map_shape = helper.make_tensor("map_shape", TensorProto.INT64, [4], [lead, 1, size, size])
    img = helper.make_tensor_value_info("image", TensorProto.UINT8, [b, size, size, 3])
    tok = helper.make_tensor_value_info("prompt_tokens", TensorProto.FLOAT, [b, n, 3])
    enc = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "tok_shape"], ["prompt_tokens"]),
        ],
        "prompt_encoder",
        [img],
        [tok],
        [tok_shape],
    )
    det = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "tok_shape"], ["q"]),
            helper.make_node("Sub", ["q", "prompt_tokens"], ["d"]),
            helper.make_node("Abs", ["d"], ["a"]),
            helper.make_node("ReduceMean", ["a"], ["m"], axes=[2], keepdims=0),
            helper.make_node("Reshape", ["m", "map_shape"], ["m4"]),
            helper.make_node(
                "AveragePool",
                ["m4"],
                ["anomaly_map"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                count_include_pad=0,
            ),
            helper.make_node(
                "ReduceMax", ["anomaly_map"], ["image_score"], axes=[1, 2, 3], keepdims=0
            ),
        ],
        "detector",
        [img, tok],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [b, 1, size, size]),
            helper.make_tensor_value_info("image_score", TensorProto.FLOAT, [b]),
        ],
        [tok_shape, map_shape],
    )
    for name, graph in (("prompt_encoder", enc), ("detector", det)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, out / f"{name}.onnx")


def pattern(cls: str = "widget", size: int = 48) -> np.ndarray:
    """The class's clean pattern (RGB), smooth so resizing keeps it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = 0.0 if cls == "widget" else 1.3
    base = 120 + 50 * np.sin(xx / 6.0 + phase) * np.cos(yy / 9.0)
    return np.clip(np.stack([base, base * 0.9, base * 0.7], -1), 0, 255).astype(np.uint8)


def normal_image(rng: np.random.Generator, cls: str = "widget", size: int = 48) -> np.ndarray:
    noise = rng.normal(0, rng.uniform(3.0, 7.0), (size, size, 3))
    return np.clip(pattern(cls, size) + noise, 0, 255).astype(np.uint8)


def defect_image(rng: np.random.Generator, cls: str = "widget", size: int = 48) -> np.ndarray:
    img = normal_image(rng, cls, size)
    c = (int(rng.integers(10, size - 10)), int(rng.integers(10, size - 10)))
    r = int(rng.integers(4, 8))
    colour = tuple(int(v) for v in rng.integers(0, 60, 3))
    cv2.circle(img, c, r, colour, -1)
    return img


def write_images(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def make_artifact(
    root: Path, classes=("widget",), size: int = SIZE, dynamic_batch: bool = False
) -> Path:
    """A valid artifact folder (model.json with sha256 of every file, fp32 ONNX graphs, one
    golden prompt image per class under prompts/); `dynamic_batch`: as `export --dynamic-batch`
    (images and prompt tokens share a dynamic batch axis)."""
    root.mkdir(parents=True, exist_ok=True)
    _graphs(root, size, dynamic_batch)
    b: int | str = "batch" if dynamic_batch else 1
    (root / "prompts").mkdir(exist_ok=True)
    prompts = {}
    for cls in classes:
        rel = f"prompts/{cls}.png"
        cv2.imwrite(str(root / rel), cv2.cvtColor(pattern(cls), cv2.COLOR_RGB2BGR))
        prompts[cls] = rel
    img = TensorSpec(name="image", shape=[b, size, size, 3], dtype="uint8")
    tok = TensorSpec(name="prompt_tokens", shape=[b, size * size, 3], dtype="float32")
    files = ["prompt_encoder.onnx", "detector.onnx", *prompts.values()]
    card = ModelCard(
        name="diff-to-prompt",
        created="2026-01-01T00:00:00Z",
        input_size=[size, size],
        resize="cv2-area",
        backbone="none",
        classes=list(classes),
        prompt_encoder=GraphSpec(
            inputs=[img], outputs=[tok], files={"onnx": "prompt_encoder.onnx"}
        ),
        detector=GraphSpec(
            inputs=[img, tok],
            outputs=[
                TensorSpec(name="anomaly_map", shape=[b, 1, size, size], dtype="float32"),
                TensorSpec(name="image_score", shape=[b], dtype="float32"),
            ],
            files={"onnx": "detector.onnx"},
        ),
        score_normalization=ScoreNormalization(
            image=Normalization(center=0.0, scale=SCALE),
            pixel=Normalization(center=0.0, scale=SCALE),
            source="test fixture",
            count=1,
        ),
        thresholds=Thresholds(image=1.0, pixel=1.0),
        precisions={
            "fp32": Precision(
                files={"prompt_encoder": "prompt_encoder.onnx", "detector": "detector.onnx"}
            )
        },
        prompts=prompts,
        sha256={f: sha256_file(root / f) for f in files},
    )
    write_card(root, card)
    return root


def write_station(
    folder: Path,
    artifact: Path,
    *,
    station_id: str = "s1",
    camera: str | None = None,
    thresholds: str = "{image: 1.0, pixel: 1.0, min_area_px: 4}",
    extra: str = "",
) -> Path:
    """A station YAML (with comments) whose prompt is the artifact's golden image."""
    folder.mkdir(parents=True, exist_ok=True)
    camera = camera or "{kind: folder, path: frames, fps: 20, loop: true}"
    path = folder / f"{station_id}.yaml"
    path.write_text(
        "# Station under calibration test\n"
        f"station_id: {station_id}   # the id\n"
        "line_id: line1\n"
        f"model: {artifact}\n"
        "engine: onnxruntime\n"
        "precision: fp32\n"
        f"camera: {camera}\n"
        f"prompt: {{image: {artifact / 'prompts' / 'widget.png'}}}\n"
        f"thresholds: {thresholds}   # tuned by hand\n"
        "evidence: {mqtt: false}\n" + extra
    )
    return path


def write_site(folder: Path, station_glob: str, broker: dict | None = None) -> Path:
    lines = ["edge_id: edge1", f"stations: [{station_glob}]", "stats_interval_s: 0.5"]
    if broker is not None:
        lines.append("broker: " + json.dumps(broker))
    site = folder / "site.yaml"
    site.write_text("\n".join(lines) + "\n")
    return site


@contextmanager
def lineguard_run(site: Path, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`lineguard run --site SITE ARGS` in its own process, stdout and stderr into LOG; on
    leaving, SIGTERM (SIGKILL after 15 s) and wait, so `returncode` is set."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [LINEGUARD, "run", "--site", str(site), *args], stdout=out, stderr=out
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
