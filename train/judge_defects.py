"""Held-out synthetic defects: a family the model NEVER trains on, for choices between maps.

The training synthesis (Perlin + texture, CutPaste, scars; :mod:`lineguard.train.synthesis`) is
what the refiner learns to find, so a validation proxy built from the same family favours the
learned map over anything untrained: on piped and MTD it judged a training-free map useless
while it was not. Choices between map components are therefore judged on defects of another
family, drawn on the NORMAL validation images: small local changes of the kinds line inspection
meets (pits and spots, thin scratches, a smeared patch, a dent-like warp), none of them pasted
content. The family was fixed before it was first used for a choice and is not tuned.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.random import Generator

KINDS = ("spot", "scratch", "smear", "dent")
VISIBLE_DELTA = 3  # grey levels that count as a visible change
MIN_VISIBLE = 0.5  # least share of mask pixels visibly changed
MAX_TRIES = 8


def _centre(shape: tuple[int, int], rng: Generator, margin: float) -> tuple[float, float]:
    h, w = shape
    return rng.uniform(margin * w, (1 - margin) * w), rng.uniform(margin * h, (1 - margin) * h)


def spot(img: np.ndarray, rng: Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged dark or bright ellipse (a pit, a stain): 1.5–6 % of the image side."""
    h, w = img.shape[:2]
    side = min(h, w)
    cx, cy = _centre((h, w), rng, 0.1)
    rx, ry = rng.uniform(0.015, 0.06, 2) * side + 1.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    alpha = np.clip(1.5 - d, 0.0, 1.0)  # flat core, soft rim
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(25, 70)
    out = img.astype(np.float32) + delta * alpha[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), (alpha >= 0.5).astype(np.float32)


def scratch(img: np.ndarray, rng: Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin (1–3 px) polyline of 2–4 segments, 15–40 % of the side long, darker or brighter."""
    h, w = img.shape[:2]
    side = min(h, w)
    n = int(rng.integers(2, 5))
    length = rng.uniform(0.15, 0.40) * side
    angle = rng.uniform(0, np.pi)
    pts = [np.array(_centre((h, w), rng, 0.15))]
    for _ in range(n):
        angle += rng.uniform(-0.5, 0.5)
        pts.append(pts[-1] + length / n * np.array([np.cos(angle), np.sin(angle)]))
    mask = np.zeros((h, w), np.uint8)
    poly = np.round(np.stack(pts)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(mask, [poly], False, 1, thickness=int(rng.integers(1, 4)))
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(30, 80)
    out = img.astype(np.float32) + delta * mask[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), mask.astype(np.float32)


def _disk(shape: tuple[int, int], rng: Generator) -> tuple[np.ndarray, float, float, float]:
    h, w = shape
    cx, cy = _centre((h, w), rng, 0.15)
    r = rng.uniform(0.04, 0.10) * min(h, w) + 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.hypot(xx - cx, yy - cy), cx, cy, r


def smear(img: np.ndarray, rng: Generator) -> tuple[np.ndarray, np.ndarray]:
    """A disk (4–10 % of the side) whose texture is blurred away and shifted ±10 grey levels."""
    dist, _, _, r = _disk(img.shape[:2], rng)
    mask = (dist <= r).astype(np.float32)
    blurred = cv2.GaussianBlur(img, (0, 0), rng.uniform(2.0, 4.0)).astype(np.float32)
    blurred += rng.uniform(-10, 10)
    out = np.where(mask[..., None] > 0, blurred, img.astype(np.float32))
    return np.clip(out, 0, 255).astype(np.uint8), mask


def dent(img: np.ndarray, rng: Generator) -> tuple[np.ndarray, np.ndarray]:
    """A radial bulge or pinch of the geometry inside a disk (4–10 % of the side)."""
    dist, cx, cy, r = _disk(img.shape[:2], rng)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.clip(dist / r, 0.0, 1.0)
    strength = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6)
    scale = 1.0 - strength * (1.0 - t) ** 2  # 1 at the rim: no seam
    map_x = (cx + (xx - cx) * scale).astype(np.float32)
    map_y = (cy + (yy - cy) * scale).astype(np.float32)
    out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = dist <= r
    out = np.where(inside[..., None], out, img)  # exactly the original outside the disk
    return out, inside.astype(np.float32)


DRAW = {"spot": spot, "scratch": scratch, "smear": smear, "dent": dent}


class JudgeDefects:
    """Callable like :class:`~lineguard.train.synthesis.DefectSynthesizer`: ``(image, rng,
    label) -> (image uint8 H×W×3, mask float32 H×W)``, kinds in turn by ``rng``."""

    def __call__(
        self, image: np.ndarray, rng: Generator, label: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 H×W×3, got {image.dtype} {image.shape}")
        kind = KINDS[int(rng.integers(len(KINDS)))]
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for _ in range(MAX_TRIES):
            out, mask = DRAW[kind](image, rng)
            n = float(mask.sum())
            delta = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
            vis = float(((delta >= VISIBLE_DELTA) & (mask > 0)).sum()) / n if n else 0.0
            if best is None or vis > best[0]:
                best = (vis, out, mask)
            if vis >= MIN_VISIBLE:
                break
        assert best is not None
        return best[1], best[2]
