"""Synthetic defects for OneNIP's restoration stream and refiner (spec §5.2–5.4).

Each normal training image (uint8 H×W×3 RGB at training resolution) gets ONE synthetic defect:
0.5 DRAEM-style Perlin blob blended with a foreign texture (β ∈ [0, 0.8)), 0.25 CutPaste
(a jittered rectangle moved elsewhere), 0.25 CutPaste-Scar (a thin rotated jittered strip).
Sizes are in pixels at the training resolution, as in the reference code. The texture source
replaces DTD (not available offline); see :mod:`lineguard.train.textures` for why and how it
was measured.

Contract (tested): pixels with mask 0 are bit-identical to the input, and most mask-1 pixels
changed. The reference marks the whole pasted region even when the paste is invisible (a patch
of flat background pasted onto flat background); we redraw such near-invisible defects instead,
because a mask over unchanged pixels is label noise for the refiner. Everything is drawn from
the numpy ``Generator`` passed in, so a (seed, epoch, index) triple reproduces a sample.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lineguard.train.perlin import perlin_mask
from lineguard.train.textures import TextureKind, TextureSource

Generator = np.random.Generator


class SynthesisConfig(BaseModel):
    """How synthetic defects are drawn (defaults = the official 'hybrid' recipe)."""

    model_config = ConfigDict(extra="forbid")

    perlin_prob: float = Field(0.5, ge=0.0, le=1.0, title="probability of a Perlin+texture defect")
    scar_share: float = Field(
        0.5, ge=0.0, le=1.0, title="share of CutPaste defects that are scars (rest: rectangles)"
    )
    textures: TextureKind = Field("mixed", title="texture source: procedural | images | mixed")
    beta_max: float = Field(
        0.8, ge=0.0, lt=1.0, title="max opacity β of the original under a texture"
    )
    perlin_min_exp: int = Field(1, ge=0, le=8, title="min log2 Perlin cells per axis")
    perlin_max_exp: int = Field(5, ge=0, le=8, title="max log2 Perlin cells per axis")
    perlin_rotation: float = Field(5.0, ge=0.0, le=180.0, title="max Perlin mask rotation, degrees")
    area_min: float = Field(
        0.02, gt=0.0, lt=1.0, title="CutPaste min patch area (fraction of image)"
    )
    area_max: float = Field(0.15, gt=0.0, lt=1.0, title="CutPaste max patch area (fraction)")
    scar_width: tuple[int, int] = Field((2, 16), title="scar width range in pixels (inclusive)")
    scar_length: tuple[int, int] = Field((10, 25), title="scar length range in pixels (inclusive)")
    scar_rotation: float = Field(45.0, ge=0.0, le=180.0, title="max scar rotation, degrees")
    min_visible: float = Field(
        0.5, ge=0.0, le=1.0, title="min fraction of mask pixels that must visibly change"
    )
    visible_delta: int = Field(3, ge=1, le=255, title="grey-level change that counts as visible")
    max_tries: int = Field(8, ge=1, title="redraws before accepting a faint defect")

    @model_validator(mode="after")
    def _ranges(self) -> SynthesisConfig:
        if self.perlin_min_exp > self.perlin_max_exp:
            raise ValueError("perlin_min_exp must be <= perlin_max_exp")
        if self.area_min > self.area_max:
            raise ValueError("area_min must be <= area_max")
        for name in ("scar_width", "scar_length"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be 1 <= low <= high")
        return self


# ----------------------------------------------------------------- colour jitter
def color_jitter(
    patch: np.ndarray,
    rng: Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> np.ndarray:
    """torchvision-style ColorJitter on a uint8 RGB patch, factors from ``rng``, random order."""
    img = patch.astype(np.float32)

    def grey(x: np.ndarray) -> np.ndarray:
        return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]

    def do_brightness(x: np.ndarray) -> np.ndarray:
        return x * rng.uniform(1 - brightness, 1 + brightness)

    def do_contrast(x: np.ndarray) -> np.ndarray:
        m = float(grey(x).mean())
        return m + (x - m) * rng.uniform(1 - contrast, 1 + contrast)

    def do_saturation(x: np.ndarray) -> np.ndarray:
        g = grey(x)
        return g + (x - g) * rng.uniform(1 - saturation, 1 + saturation)

    def do_hue(x: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        shift = round(rng.uniform(-hue, hue) * 180)
        if shift == 0:
            return x
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)

    ops = (do_brightness, do_contrast, do_saturation, do_hue)
    for i in rng.permutation(len(ops)):
        img = np.clip(ops[int(i)](img), 0, 255)
    return img.astype(np.uint8)


# ----------------------------------------------------------------- CutPaste
def _paste(
    image: np.ndarray, patch: np.ndarray, alpha: np.ndarray, y: int, x: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``patch`` where ``alpha`` is set, top-left at (y, x), clipped to the image."""
    h, w = image.shape[:2]
    ph, pw = alpha.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + ph, h), min(x + pw, w)
    out = image.copy()
    mask = np.zeros((h, w), np.float32)
    if y1 <= y0 or x1 <= x0:
        return out, mask
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x] > 0
    region = out[y0:y1, x0:x1]
    region[a] = patch[y0 - y : y1 - y, x0 - x : x1 - x][a]
    mask[y0:y1, x0:x1] = a
    return out, mask


def cutpaste(
    image: np.ndarray, rng: Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Normal CutPaste: a jittered rectangle (2–15 % of the area) pasted at a random place."""
    h, w = image.shape[:2]
    area = rng.uniform(cfg.area_min, cfg.area_max) * h * w
    aspect = rng.uniform(0.3, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 3.3)
    pw = int(np.clip(int(np.sqrt(area * aspect)), 1, w))
    ph = int(np.clip(int(np.sqrt(area / aspect)), 1, h))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = color_jitter(image[sy : sy + ph, sx : sx + pw], rng)
    dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    return _paste(image, patch, np.ones((ph, pw), np.uint8), dy, dx)


def _rotate_expand(patch: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate with an expanded canvas (nearest neighbour), returning the patch and its alpha."""
    ph, pw = patch.shape[:2]
    m = cv2.getRotationMatrix2D((pw / 2.0, ph / 2.0), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(ph * sin + pw * cos)), int(np.ceil(ph * cos + pw * sin))
    m[0, 2] += nw / 2.0 - pw / 2.0
    m[1, 2] += nh / 2.0 - ph / 2.0
    flags = dict(flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    rotated = cv2.warpAffine(patch, m, (nw, nh), **flags)
    alpha = cv2.warpAffine(np.full((ph, pw), 255, np.uint8), m, (nw, nh), **flags)
    return rotated, alpha


def cutpaste_scar(
    image: np.ndarray, rng: Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-Scar: a thin jittered strip, rotated ±45°, pasted through its alpha.

    The location is drawn with the un-rotated size, so the rotated strip may run over the
    border and is clipped (as in the reference).
    """
    h, w = image.shape[:2]
    pw = min(int(rng.integers(cfg.scar_width[0], cfg.scar_width[1] + 1)), w)
    ph = min(int(rng.integers(cfg.scar_length[0], cfg.scar_length[1] + 1)), h)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = color_jitter(image[sy : sy + ph, sx : sx + pw], rng)
    patch, alpha = _rotate_expand(patch, float(rng.uniform(-cfg.scar_rotation, cfg.scar_rotation)))
    dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    return _paste(image, patch, alpha, dy, dx)


# ----------------------------------------------------------------- Perlin + texture
def perlin_blend(
    image: np.ndarray, texture: np.ndarray, rng: Generator, cfg: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
    """I·(1−m) + (1−β)·T·m + β·I·m with a Perlin blob mask m and β ∈ [0, beta_max)."""
    h, w = image.shape[:2]
    m = perlin_mask(
        (h, w), rng, cfg.perlin_min_exp, cfg.perlin_max_exp, cfg.perlin_rotation, min_pixels=1
    )
    beta = cfg.beta_max * rng.random()
    img = image.astype(np.float32)
    blended = (1.0 - beta) * texture.astype(np.float32) + beta * img
    out = np.where(m[..., None] > 0, blended, img)
    return out.astype(np.uint8), m  # truncation, like the reference np.uint8 cast


# ----------------------------------------------------------------- the mix
class DefectSynthesizer:
    """Draws one synthetic defect per call: ``(image uint8 H×W×3, mask float32 H×W {0,1})``."""

    def __init__(self, cfg: SynthesisConfig | None = None, textures: TextureSource | None = None):
        self.cfg = cfg or SynthesisConfig()
        self.textures = textures or TextureSource("procedural")

    def kind(self, rng: Generator) -> str:
        """'perlin' (p), else 'scar' or 'cutpaste' by ``scar_share``."""
        if rng.random() < self.cfg.perlin_prob:
            return "perlin"
        return "scar" if rng.random() < self.cfg.scar_share else "cutpaste"

    def draw(
        self, image: np.ndarray, rng: Generator, kind: str, label: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One defect of the given kind (no visibility check)."""
        if kind == "perlin":
            tex = self.textures.sample(image.shape[:2], rng, label)
            return perlin_blend(image, tex, rng, self.cfg)
        if kind == "scar":
            return cutpaste_scar(image, rng, self.cfg)
        if kind == "cutpaste":
            return cutpaste(image, rng, self.cfg)
        raise ValueError(f"unknown defect kind {kind!r}")

    def visible_fraction(self, image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
        """Fraction of mask pixels whose largest channel change is >= ``visible_delta``."""
        n = float(mask.sum())
        if n == 0:
            return 0.0
        delta = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(axis=-1)
        return float(((delta >= self.cfg.visible_delta) & (mask > 0)).sum()) / n

    def __call__(
        self, image: np.ndarray, rng: Generator, label: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 H×W×3, got {image.dtype} {image.shape}")
        kind = self.kind(rng)
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for _ in range(self.cfg.max_tries):
            out, mask = self.draw(image, rng, kind, label)
            vis = self.visible_fraction(image, out, mask)
            if best is None or vis > best[0]:
                best = (vis, out, mask)
            if vis >= self.cfg.min_visible:
                break
        assert best is not None
        return best[1], best[2]
