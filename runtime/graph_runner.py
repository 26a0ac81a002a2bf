"""The backend-agnostic half of an inference engine: the graphs' inputs and outputs, the checks
on what goes in, and the runner interface both backends (`lineguard.runtime.engine`) implement.

Kept apart so the compress stage's gates, the shared engine pool and the tests can speak to a
runner without pulling in a backend.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.runtime.errors import LineGuardError

IMAGE, TOKENS = "image", "prompt_tokens"
ANOMALY_MAP, IMAGE_SCORE, PROMPT_TOKENS = "anomaly_map", "image_score", "prompt_tokens"

DetectResult = tuple[np.ndarray, float]


def check_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Validate an RGB uint8 H×W×3 frame at the model input size; returns a 1×H×W×3 view."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise LineGuardError(
            f"image must be a uint8 numpy array, got {getattr(rgb, 'dtype', type(rgb))}"
        )
    if rgb.shape != (size[0], size[1], 3):
        raise LineGuardError(
            f"image must be RGB {size[0]}x{size[1]}x3 (the model input size), got "
            f"{rgb.shape}; resize with Engine.prepare() first"
        )
    return np.ascontiguousarray(rgb)[None]


def check_batch(images: np.ndarray, tokens: np.ndarray, size: tuple[int, int]) -> tuple:
    """Validate a batch: images u8 N×H×W×3 at the input size, tokens N×n×D or 1×n×D."""
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[1:] != (size[0], size[1], 3):
        raise LineGuardError(
            f"batch must be uint8 N×{size[0]}×{size[1]}×3, got {imgs.dtype} {imgs.shape}"
        )
    toks = np.asarray(tokens, dtype=np.float32)
    toks = toks[None] if toks.ndim == 2 else toks
    if toks.ndim != 3 or len(toks) not in (1, len(imgs)):
        raise LineGuardError(f"tokens must be 1×N×D or {len(imgs)}×N×D, got {toks.shape}")
    return np.ascontiguousarray(imgs), np.ascontiguousarray(toks)


class GraphRunner:
    """One backend's compiled prompt encoder + detector (paths, no model card needed).

    The compress stage's gates use this directly on freshly exported files; stations get it
    through `load_engine`, which reads and verifies `model.json` first.
    """

    backend: str = ""
    precision: str = "fp32"
    input_size: tuple[int, int] = (0, 0)
    batch_images: bool = False  # the detector takes N images per call
    batch_tokens: bool = False  # ... and N prompt tokens alongside (per-tile prompts)

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        """Golden sample RGB u8 H×W×3 -> prompt tokens float32 1×N×D."""
        raise NotImplementedError

    def detect(self, rgb: np.ndarray, tokens: np.ndarray) -> DetectResult:
        """Frame RGB u8 H×W×3 + prompt tokens -> (raw anomaly map H×W float32, raw score)."""
        raise NotImplementedError

    def detect_async(self, rgb: np.ndarray, tokens: np.ndarray) -> Future[DetectResult]:
        """Start `detect` without blocking the caller; the Future holds `(map, score)`."""
        raise NotImplementedError

    def detect_batch(self, images: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images u8 N×H×W×3 + tokens (N or 1)×n×D -> (raw maps N×H×W f32, raw scores N f32):
        one call where the graph's batch is dynamic, else one call per image."""
        imgs, toks = check_batch(images, tokens, self.input_size)
        n = len(imgs)
        shared = len(toks) == 1 or bool((toks == toks[:1]).all())
        if self.batch_images and (self.batch_tokens or shared):
            if self.batch_tokens and len(toks) != n:
                toks = np.ascontiguousarray(np.repeat(toks[:1], n, axis=0))
            elif not self.batch_tokens:
                toks = toks[:1]
            amap, score = self._run_batch(imgs, toks)
            return amap.reshape(n, *amap.shape[-2:]), score.reshape(n)
        outs = [self.detect(imgs[i], toks[i : i + 1] if len(toks) > 1 else toks) for i in range(n)]
        return np.stack([m for m, _ in outs]), np.array([s for _, s in outs], np.float32)

    def _run_batch(self, imgs: np.ndarray, toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Wait for in-flight async work; the runner must not be used afterwards."""


def existing_file(path: str | Path) -> str:
    """`path` as a string, or a clear error naming the missing model file."""
    if not Path(path).is_file():
        raise LineGuardError(f"model file {path} does not exist")
    return str(path)


def as_tokens(tokens: np.ndarray) -> np.ndarray:
    """Prompt tokens as a contiguous float32 1×N×D array (a 2-D N×D gains the batch axis)."""
    t = np.asarray(tokens, dtype=np.float32)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] != 1:
        raise LineGuardError(f"prompt tokens must be 1×N×D (from encode_prompt), got {t.shape}")
    return np.ascontiguousarray(t)


def unpack(amap: Any, score: Any) -> DetectResult:
    """One image's raw outputs of any backend -> (map H×W float32, score)."""
    m = np.array(amap, dtype=np.float32).reshape(amap.shape[-2:])
    return m, float(np.asarray(score).reshape(-1)[0])
