"""One compiled model per (artifact, backend, precision), shared by every station of a process.

Why: a compiled copy per station costs ~165 MB of RSS each and makes the stations' inference
threads fight over the cores with no scheduler in between. Shared instead:
* OpenVINO: ONE compiled detector (and prompt encoder) with `NUM_STREAMS` streams; each station
  gets its OWN infer request on it (requests are cheap, the plugin maps them onto streams), and
  its prompt tokens are bound to that request once, so a frame only sets its image.
* ONNX Runtime: ONE `InferenceSession` (its `run` is thread-safe); each station calls it from
  its own inference thread.
Prompt tokens stay per station (`Pipeline.tokens`); the engine never mixes them.
A tiled station's frame (runtime/tiling.py) goes to its request as ONE batch of all tiles with
their per-position tokens (`StationEngine.detect_batch`) where the artifact was exported with
`--dynamic-batch`; a static batch-1 artifact runs its tiles one call each, same results.

Thread rule (`plan_threads`, documented in docs/performance.md "Inference threads"): with C
cores for inference and N stations in the process, a model used by k of them gets
c = max(1, round(C·k/N)) cores, s = min(k, c) streams and t = max(1, c // s) threads per stream
(OpenVINO `INFERENCE_NUM_THREADS` = s·t; ONNX Runtime `intra_op_num_threads` = t). One station on
2 cores: 1 stream × 2 threads (lowest latency); 2 or 4 stations on 2 cores: 2 streams × 1 thread
(throughput: two frames in flight, no thread hand-offs inside a frame).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.runtime.engine import Engine, load_engine
from lineguard.runtime.graph_runner import (
    ANOMALY_MAP,
    IMAGE,
    IMAGE_SCORE,
    TOKENS,
    DetectResult,
    as_tokens,
    check_batch,
    check_image,
)

log = logging.getLogger(__name__)

EngineKey = tuple[str, str, str]  # resolved artifact folder, backend, precision


def cpu_cores() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """How one shared model runs: `streams` parallel inferences of `threads_per_stream` each."""

    streams: int
    threads_per_stream: int

    @property
    def threads(self) -> int:
        return self.streams * self.threads_per_stream


def plan_threads(
    cores: int,
    stations: int,
    total_stations: int,
    streams: int | None = None,
    threads_per_stream: int | None = None,
) -> ThreadPlan:
    """Streams/threads for a model used by `stations` of `total_stations` (module docstring);
    `streams` / `threads_per_stream` override the rule when the site config sets them."""
    if cores < 1 or stations < 1 or total_stations < stations:
        raise ValueError("need cores >= 1 and 1 <= stations <= total_stations")
    share = max(1, round(cores * stations / total_stations))
    s = streams if streams is not None else min(stations, share)
    t = threads_per_stream if threads_per_stream is not None else max(1, share // s)
    return ThreadPlan(streams=int(s), threads_per_stream=int(t))


def engine_key(cfg: Any) -> EngineKey:
    return (str(Path(cfg.model).resolve()), str(cfg.engine), str(cfg.precision))


class StationEngine:
    """One station's handle on a shared `Engine`: the Engine API the pipeline uses, with its own
    OpenVINO infer request (tokens bound once) so stations never wait on each other's locks.

    The map `detect` returns may be a view of the request's output buffer: it is valid until
    this handle's next `detect`, which is how the pipeline uses it (it normalises into a new
    array straight away)."""

    def __init__(self, shared: Engine) -> None:
        self.shared = shared
        self.card = shared.card
        self.artifact_dir = shared.artifact_dir
        self.backend, self.precision = shared.backend, shared.precision
        self.input_size = shared.input_size
        self._bound: np.ndarray | None = None  # the tokens bound to the request, as given
        self._bound_n = 0  # 0: bound for `detect`; n: for a batch of n (`detect_batch`)
        self._bound_array: np.ndarray | None = None
        self._batched = False  # whether the bound batch tokens suit one call for all images
        compiled = getattr(shared.runner, "compiled_detector", None)
        self._request = None if compiled is None else compiled.create_infer_request()
        if self._request is not None:
            self._map_port = compiled.output(ANOMALY_MAP)
            self._score_port = compiled.output(IMAGE_SCORE)

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        return self.shared.prepare(frame)

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        return self.shared.encode_prompt(rgb)  # the shared encoder, under its own lock

    def normalize(self, amap: np.ndarray, score: float) -> DetectResult:
        return self.shared.normalize(amap, score)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray) -> DetectResult:
        if self._request is None:  # ONNX Runtime: the shared session is thread-safe
            return self.shared.detect(rgb, tokens)
        if tokens is not self._bound or self._bound_n:  # once per station (and prompt change)
            self._bind(tokens, as_tokens(tokens), 0)
        self._set_image(check_image(rgb, self.input_size))
        self._request.infer()
        amap = self._request.get_tensor(self._map_port).data
        score = self._request.get_tensor(self._score_port).data
        return amap.reshape(amap.shape[-2:]), float(score.reshape(-1)[0])

    def detect_batch(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A frame's tiles (u8 N×H×W×3) with their tokens (N or 1)×n×D -> (raw maps N×H×W,
        raw scores N), copies. On this station's own request: ONE call for all N where the
        detector's batch is dynamic (tokens bound once per tokens array and N), else one call
        per image. ONNX Runtime: the shared runner's `detect_batch` (same rule)."""
        if self._request is None:
            return self.shared.detect_batch(images, tokens)
        runner = self.shared.runner
        n = len(images)
        if runner.batch_images and (tokens is not self._bound or self._bound_n != n):
            imgs, toks = check_batch(images, tokens, self.input_size)
            same = len(toks) == 1 or bool((toks == toks[:1]).all())
            self._batched = bool(runner.batch_tokens or same)
            if self._batched:  # the runner's rule (GraphRunner.detect_batch)
                if runner.batch_tokens and len(toks) != n:
                    toks = np.ascontiguousarray(np.repeat(toks[:1], n, axis=0))
                elif not runner.batch_tokens:
                    toks = toks[:1]
                self._bind(tokens, toks, n)
        if runner.batch_images and self._batched:
            imgs, _ = check_batch(images, self._bound_array, self.input_size)
            self._set_image(imgs)
            self._request.infer()
            amap = self._request.get_tensor(self._map_port).data
            score = self._request.get_tensor(self._score_port).data
            return (
                np.array(amap, np.float32).reshape(n, *amap.shape[-2:]),
                np.array(score, np.float32).reshape(n),
            )
        imgs, toks = check_batch(images, tokens, self.input_size)
        maps, scores = [], []
        for i in range(n):  # static batch: one call per image, each output copied out
            amap, score = self.detect(imgs[i], toks[i : i + 1] if len(toks) > 1 else toks)
            maps.append(np.array(amap, np.float32))
            scores.append(score)
        return np.stack(maps), np.array(scores, np.float32)

    def _bind(self, tokens: np.ndarray, prepared: np.ndarray, n: int) -> None:
        import openvino as ov

        self._request.set_tensor(TOKENS, ov.Tensor(prepared, shared_memory=True))
        self._bound, self._bound_n = tokens, n
        self._bound_array = prepared  # keeps the shared buffer alive

    def _set_image(self, image: np.ndarray) -> None:
        import openvino as ov

        self._request.set_tensor(IMAGE, ov.Tensor(image, shared_memory=True))

    def close(self) -> None:
        """Nothing to free: the shared engine belongs to the pool, the request to this handle."""


class EnginePool:
    """Loads each (artifact, backend, precision) once, with threads planned for its stations."""

    def __init__(
        self,
        station_configs: Iterable[Any],
        cores: int | None = None,
        streams: int | None = None,
        threads_per_stream: int | None = None,
    ) -> None:
        configs = list(station_configs)
        self.cores = cores or cpu_cores()
        self._users = Counter(engine_key(c) for c in configs)
        self._total = max(1, len(configs))
        self._streams, self._tps = streams, threads_per_stream
        self._engines: dict[EngineKey, Engine] = {}
        self.plans: dict[EngineKey, ThreadPlan] = {}
        self._lock = threading.Lock()

    def plan(self, cfg: Any) -> ThreadPlan:
        key = engine_key(cfg)
        return plan_threads(
            self.cores, self._users.get(key, 1), self._total, self._streams, self._tps
        )

    def station_engine(self, cfg: Any) -> StationEngine:
        """The shared engine for this station's model (loaded on first use), as its own handle."""
        key = engine_key(cfg)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                plan = self.plan(cfg)
                streams = plan.streams if cfg.engine == "openvino" else None
                threads = plan.threads if cfg.engine == "openvino" else plan.threads_per_stream
                engine = load_engine(
                    cfg.model,
                    backend=cfg.engine,
                    precision=cfg.precision,
                    threads=threads,
                    streams=streams,
                )
                self._engines[key], self.plans[key] = engine, plan
                log.info(
                    "model %s (%s %s) shared by %d station(s): %d stream(s) x %d thread(s) on %d "
                    "core(s)",
                    key[0],
                    key[1],
                    key[2],
                    self._users.get(key, 1),
                    plan.streams,
                    plan.threads_per_stream,
                    self.cores,
                )
        return StationEngine(engine)

    def __len__(self) -> int:
        return len(self._engines)

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                try:
                    engine.close()
                except Exception:
                    log.exception("engine close failed")
            self._engines.clear()
