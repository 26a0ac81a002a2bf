"""Inference engines for a LineGuard model artifact: OpenVINO and ONNX Runtime, never torch.

A station encodes its golden prompt ONCE (`encode_prompt`) and then runs `detect` on every frame
against those tokens. Outputs are RAW (`anomaly_map` H×W, `image_score`); `normalize` applies the
card's score normalisation so thresholds are in normalised units.

Precision is an explicit, measured choice, never an accident of the CPU:
* `fp32`  — FP32 IR with `INFERENCE_PRECISION_HINT=f32`. Without the hint OpenVINO silently runs
  bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), which moves maps by ~1 % of their range.
* `bf16`  — the same FP32 IR with the bf16 hint (faster where the CPU has bf16, else like fp32).
* `int8`  — the NNCF-quantised detector (`*_int8.xml`); the ops left in float (LayerNorm, softmax,
  residual adds, the map's resize) run in the precision the card's `float_ops` names (f32 or bf16),
  exactly as the compress stage's INT8 gate measured them; bf16 falls back to f32 on CPUs without
  native bf16. The prompt encoder stays FP32 (runs once).
ONNX Runtime runs the ONNX graphs in fp32 only.

`detect_batch` runs many images (the tiles of a frame) in ONE call when the detector was exported
with a dynamic batch (`lineguard export --dynamic-batch`), each with its own prompt tokens; a
static batch-1 artifact falls back to one call per image, same results.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lineguard.runtime.artifact import ModelCard, load_card
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.graph_runner import (
    ANOMALY_MAP,
    IMAGE,
    IMAGE_SCORE,
    PROMPT_TOKENS,
    TOKENS,
    DetectResult,
    GraphRunner,
    as_tokens,
    check_image,
    existing_file,
    unpack,
)

Backend = Literal["openvino", "onnxruntime"]
PrecisionName = Literal["fp32", "int8", "bf16"]
BACKENDS: tuple[str, ...] = ("openvino", "onnxruntime")
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "bf16")

#: OpenVINO inference precision per engine precision (see module docstring).
OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVINORunner(GraphRunner):
    """OpenVINO CPU runner; async detection through an `AsyncInferQueue`."""

    backend = "openvino"

    def __init__(
        self,
        encoder_xml: str | Path,
        detector_xml: str | Path,
        precision: str = "fp32",
        threads: int = 2,
        async_jobs: int = 1,
        cache_dir: str | Path | None = None,
        device: str = "CPU",
        extra_config: dict[str, Any] | None = None,
        float_ops: str = "f32",
        streams: int | None = None,
    ) -> None:
        import openvino as ov

        if precision not in OV_HINT:
            raise LineGuardError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        if float_ops not in ("f32", "bf16"):
            raise LineGuardError(f"float_ops must be f32 or bf16, not {float_ops!r}")
        self.precision = precision
        self.inference_precision: str | None = None  # what OpenVINO was told (CPU only)
        core = ov.Core()
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if streams is not None:  # shared by several stations (engine_pool.py): one per stream
            config = {"PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY"}
            config["NUM_STREAMS"] = int(streams)
        if device.startswith("CPU"):
            hint = float_ops if precision == "int8" else OV_HINT[precision]
            if hint == "bf16" and "BF16" not in core.get_property(
                device, "OPTIMIZATION_CAPABILITIES"
            ):
                hint = "f32"  # no native bf16: emulation would be slower, f32 more faithful
            self.inference_precision = hint
            config["INFERENCE_PRECISION_HINT"] = hint
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config.update(extra_config or {})
        enc_config = (
            {**config, "INFERENCE_PRECISION_HINT": "f32"} if device.startswith("CPU") else config
        )
        self._encoder = core.compile_model(_read(core, encoder_xml), device, enc_config)
        self._detector = core.compile_model(_read(core, detector_xml), device, config)
        self.compiled_detector = self._detector  # stations of a shared engine make own requests
        shape = self._detector.input(IMAGE).get_partial_shape()
        self.input_size = (int(shape[1].get_length()), int(shape[2].get_length()))
        self.batch_images = shape[0].is_dynamic
        self.batch_tokens = self._detector.input(TOKENS).get_partial_shape()[0].is_dynamic
        self._map_port = self._detector.output(ANOMALY_MAP)
        self._score_port = self._detector.output(IMAGE_SCORE)
        self._enc_request = self._encoder.create_infer_request()
        self._request = self._detector.create_infer_request()
        self._lock = threading.Lock()
        self._queue = ov.AsyncInferQueue(self._detector, max(1, int(async_jobs)))
        self._queue.set_callback(self._on_done)
        self._queue_lock = threading.Lock()

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        image = check_image(rgb, self.input_size)
        with self._lock:
            out = self._enc_request.infer({IMAGE: image}, share_inputs=True)
            return np.array(out[self._encoder.output(PROMPT_TOKENS)], dtype=np.float32)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray) -> DetectResult:
        inputs = {IMAGE: check_image(rgb, self.input_size), TOKENS: as_tokens(tokens)}
        with self._lock:
            out = self._request.infer(inputs, share_inputs=True)
            return unpack(out[self._map_port], out[self._score_port])

    def _run_batch(self, imgs: np.ndarray, toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            out = self._request.infer({IMAGE: imgs, TOKENS: toks}, share_inputs=True)
            m, s = out[self._map_port], out[self._score_port]
            return np.array(m, np.float32), np.array(s, np.float32)

    def detect_async(self, rgb: np.ndarray, tokens: np.ndarray) -> Future[DetectResult]:
        inputs = {IMAGE: check_image(rgb, self.input_size), TOKENS: as_tokens(tokens)}
        fut: Future[DetectResult] = Future()
        fut.set_running_or_notify_cancel()
        with self._queue_lock:  # start_async waits for a free request: natural backpressure
            self._queue.start_async(inputs, fut)
        return fut

    def _on_done(self, request: Any, fut: Future[DetectResult]) -> None:
        try:
            fut.set_result(
                unpack(
                    request.get_tensor(self._map_port).data,
                    request.get_tensor(self._score_port).data,
                )
            )
        except Exception as exc:  # surfaced to whoever waits on the future
            fut.set_exception(exc)

    def close(self) -> None:
        self._queue.wait_all()


class OnnxRuntimeRunner(GraphRunner):
    """ONNX Runtime CPU runner (fp32); async detection on a small thread pool."""

    backend = "onnxruntime"

    def __init__(
        self,
        encoder_onnx: str | Path,
        detector_onnx: str | Path,
        precision: str = "fp32",
        threads: int = 2,
        async_jobs: int = 1,
    ) -> None:
        import onnxruntime as ort

        if precision != "fp32":
            raise LineGuardError(
                f"the onnxruntime backend runs fp32 only, not {precision!r}; "
                "use backend='openvino' for int8/bf16"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(existing_file(encoder_onnx), opts, providers=providers)
        self._detector = ort.InferenceSession(
            existing_file(detector_onnx), opts, providers=providers
        )
        ins = {i.name: i.shape for i in self._detector.get_inputs()}
        self.input_size = (int(ins[IMAGE][1]), int(ins[IMAGE][2]))
        self.batch_images = not isinstance(ins[IMAGE][0], int)
        self.batch_tokens = not isinstance(ins[TOKENS][0], int)
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(async_jobs)))

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        (tokens,) = self._encoder.run([PROMPT_TOKENS], {IMAGE: check_image(rgb, self.input_size)})
        return np.asarray(tokens, dtype=np.float32)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray) -> DetectResult:
        inputs = {IMAGE: check_image(rgb, self.input_size), TOKENS: as_tokens(tokens)}
        amap, score = self._detector.run([ANOMALY_MAP, IMAGE_SCORE], inputs)
        return unpack(amap, score)

    def _run_batch(self, imgs: np.ndarray, toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self._detector.run([ANOMALY_MAP, IMAGE_SCORE], {IMAGE: imgs, TOKENS: toks})
        return np.asarray(amap, np.float32), np.asarray(score, np.float32)

    def detect_async(self, rgb: np.ndarray, tokens: np.ndarray) -> Future[DetectResult]:
        check_image(rgb, self.input_size)
        return self._pool.submit(self.detect, rgb, tokens)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Engine:
    """A loaded, verified artifact: a runner plus its model card (what stations use).

    `card` is the card as THIS engine sees it: its `score_normalization` is the one measured
    with this precision when the artifact has one (INT8), so `normalize` and anything reading
    `card.score_normalization` stay consistent.
    """

    def __init__(self, runner: GraphRunner, card: ModelCard, artifact_dir: Path) -> None:
        self.runner = runner
        self.card = card
        self.artifact_dir = artifact_dir
        self.backend = runner.backend
        self.precision = runner.precision
        self.input_size = runner.input_size

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        """Any RGB/gray uint8 frame -> RGB u8 at the input size with the card's resize rule."""
        import cv2

        if frame.dtype != np.uint8:
            raise LineGuardError(f"frame must be uint8, got {frame.dtype}")
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        elif frame.ndim != 3 or frame.shape[2] != 3:
            raise LineGuardError(f"frame must be H×W×3 RGB or H×W gray, got shape {frame.shape}")
        h, w = self.input_size
        if frame.shape[:2] == (h, w):
            return np.ascontiguousarray(frame)
        interp = cv2.INTER_AREA if self.card.resize == "cv2-area" else cv2.INTER_LINEAR
        return cv2.resize(frame, (w, h), interpolation=interp)

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        """Golden sample (RGB u8 at the input size) -> prompt tokens 1×N×D, once per station."""
        return self.runner.encode_prompt(rgb)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray) -> DetectResult:
        """Frame (RGB u8 at the input size) -> (raw map H×W float32, raw image score)."""
        return self.runner.detect(rgb, tokens)

    def detect_async(self, rgb: np.ndarray, tokens: np.ndarray) -> Future[DetectResult]:
        """Non-blocking `detect`; blocks only while all `async_jobs` requests are busy."""
        return self.runner.detect_async(rgb, tokens)

    def detect_batch(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Many images (a frame's tiles) with their tokens: batched when the artifact allows."""
        return self.runner.detect_batch(images, tokens)

    def normalize(self, amap: np.ndarray, score: float) -> DetectResult:
        """Raw outputs -> normalised units ((raw - center) / scale; 1.0 ≈ p99 of normal val)."""
        n = self.card.score_normalization
        map_n = (amap - np.float32(n.pixel.center)) / np.float32(n.pixel.scale)
        return map_n.astype(np.float32, copy=False), (float(score) - n.image.center) / n.image.scale

    def close(self) -> None:
        self.runner.close()


def load_engine(
    artifact_dir: str | Path,
    backend: str = "openvino",
    precision: str = "fp32",
    threads: int = 2,
    async_jobs: int = 1,
    cache_dir: str | Path | None = None,
    verify: bool = True,
    streams: int | None = None,
) -> Engine:
    """Read and verify `model.json`, then compile the graphs for `backend` at `precision`."""
    root = Path(artifact_dir)
    if backend not in BACKENDS:
        raise LineGuardError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise LineGuardError(
            f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}"
        )
    card = load_card(root, verify=verify)
    if backend == "onnxruntime":
        runner: GraphRunner = OnnxRuntimeRunner(
            root / _graph_file(card, "prompt_encoder", "onnx", root),
            root / _graph_file(card, "detector", "onnx", root),
            precision=precision,
            threads=threads,
            async_jobs=async_jobs,
        )
    else:
        files_of = "fp32" if precision == "bf16" else precision
        if files_of not in card.precisions:
            have = ", ".join(sorted(card.precisions)) or "none"
            raise LineGuardError(
                f"{root}: artifact has no {precision} model (precisions: {have}); "
                "run `lineguard quantize --artifact` for int8"
            )
        files = card.precisions[files_of].files
        encoder = files.get("prompt_encoder") or _graph_file(
            card, "prompt_encoder", "openvino", root
        )
        runner = OpenVINORunner(
            root / encoder,
            root / files["detector"],
            precision=precision,
            float_ops=card.precisions[files_of].float_ops,
            threads=threads,
            async_jobs=async_jobs,
            cache_dir=cache_dir,
            streams=streams,
        )
    own = card.precisions.get("fp32" if precision == "bf16" else precision)
    if own is not None and own.score_normalization is not None:
        # thresholds are in normalised units: INT8 keeps "1.0 = p99 of normal val" only with
        # the statistics measured on its own outputs
        card = card.model_copy(update={"score_normalization": own.score_normalization})
    if tuple(runner.input_size) != tuple(card.input_size):
        raise LineGuardError(
            f"{root}: graphs take {runner.input_size} but model.json says {card.input_size}"
        )
    return Engine(runner, card, root)


def _graph_file(card: ModelCard, graph: str, fmt: str, root: Path) -> str:
    files = getattr(card, graph).files
    if fmt not in files:
        raise LineGuardError(f"{root}: model.json lists no {fmt} file for {graph}")
    return files[fmt]


def _read(core: Any, xml: str | Path) -> Any:
    return core.read_model(existing_file(xml))
