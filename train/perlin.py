"""Perlin noise and DRAEM-style Perlin defect masks (spec §5.4), seeded by a numpy Generator.

Own implementation (gradient noise with the quintic fade 6t⁵ − 15t⁴ + 10t³). Unlike the
reference ``rand_perlin_2d_np`` it accepts any image size (cells need not divide it), so a
training resolution like 200 px works; at sizes divisible by the resolution it is the same noise.
"""

from __future__ import annotations

import cv2
import numpy as np


def fade(t: np.ndarray) -> np.ndarray:
    """Quintic smoothstep: zero first and second derivative at the lattice points."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D gradient noise of ``shape`` with ``res`` cells per axis, float32 in about [-1, 1].

    Random unit gradients sit on the (res+1)² lattice; each pixel blends the dot products of its
    four corner gradients with its offsets, weighted by :func:`fade`.
    """
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(h) + 0.5) * ry / h
    x = (np.arange(w) + 0.5) * rx / w
    yi = np.minimum(np.floor(y).astype(np.int64), ry - 1)
    xi = np.minimum(np.floor(x).astype(np.int64), rx - 1)
    fy = (y - yi)[:, None]
    fx = (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (np.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int], base_res: int, octaves: int, rng: np.random.Generator
) -> np.ndarray:
    """Sum of octaves (res doubling, amplitude halving), normalised to [0, 1]; for textures."""
    out = np.zeros(shape, np.float32)
    amp, res = 1.0, base_res
    for _ in range(octaves):
        out += amp * perlin_noise(shape, (res, res), rng)
        amp, res = amp * 0.5, res * 2
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, constant-0 fill (rotated-in corners hold no anomaly)."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), degrees, 1.0)
    return cv2.warpAffine(
        image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    min_exp: int = 1,
    max_exp: int = 5,
    max_rotation: float = 5.0,
    threshold: float = 0.5,
    min_pixels: int = 1,
    tries: int = 10,
) -> np.ndarray:
    """DRAEM-style blob mask: 1[rotated Perlin noise > threshold], float32 {0, 1}.

    Cells per axis are 2^a and 2^b with a, b independent in [min_exp, max_exp] (spec: 2..32).
    The reference code may return an empty mask; an empty "defect" teaches the refiner nothing,
    so we redraw (up to ``tries``) until at least ``min_pixels`` are set.
    """
    mask = np.zeros(shape, np.float32)
    for _ in range(max(1, tries)):
        ry = 2 ** int(rng.integers(min_exp, max_exp + 1))
        rx = 2 ** int(rng.integers(min_exp, max_exp + 1))
        noise = perlin_noise(shape, (ry, rx), rng)
        noise = rotate(noise, float(rng.uniform(-max_rotation, max_rotation)))
        mask = (noise > threshold).astype(np.float32)
        if mask.sum() >= min_pixels:
            break
    return mask
