"""Per-frame processing of one station, free of threads and I/O: frame in, decision out.

frame → ROI crop → resize to the model input (cv2.INTER_AREA, the training rule) → engine →
normalise map and score with the artifact's calibration ((raw − center) / scale) → ignored pixels
set to 0 → pixel threshold → connected regions ≥ `min_area_px` (model-input pixels) → decision.

Decision rule: a frame is defective iff its normalised image score ≥ the image threshold AND at
least one region survives (outside the ignore masks, large enough). Requiring a region is what
makes ignore masks and the minimum area effective: the model's image score is pooled over the
whole crop, so a bright spot inside a masked area (a label, a clamp) would otherwise still alert.
`require_region=False` gives the plain image-score rule.

The prompt tokens are computed once, from the golden image through the same ROI/resize rule.
With `tiling` (runtime/tiling.py) the ROI is instead resized by a fixed scale and cut into
overlapping model-input tiles, all run in one batched call against per-position prompt tokens;
the tile maps are stitched into one map of the ROI (one map pixel = `scale` frame pixels), and
everything after (ignore masks, thresholds, regions, evidence, calibration) works on that map.
The frame's image score is the max over its tiles, each on its own position's ruler when the
station has them (`tiling.position_norm`, from `lineguard calibrate --positions`).
Thresholds can change from another thread (MQTT `threshold/set`): `set_thresholds` swaps an
immutable `Thresholds` object and `process` reads it once per frame, so a change applies from
the next frame on and a frame never mixes old and new values.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from lineguard.runtime.regions import (
    Box,
    Region,
    find_regions,
    ignore_mask,
    polygons_to_pixels,
    roi_pixels,
)
from lineguard.runtime.threshold_limits import check_area, check_score
from lineguard.runtime.tiling import (
    Grid,
    TilingConfig,
    cut,
    detect_tiles,
    make_grid,
    position_arrays,
    prompt_tokens,
    ruled_max,
    stitch,
    to_canvas,
)

log = logging.getLogger(__name__)

# per frame size: ROI box, ignore mask, its complement, tile grid (None unless tiled)
Geometry = tuple[Box, np.ndarray | None, np.ndarray | None, Grid | None]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Decision thresholds in normalised units; `min_area_px` in model-input pixels."""

    image: float
    pixel: float
    min_area_px: int = 16

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "pixel": self.pixel, "min_area_px": self.min_area_px}

    @classmethod
    def resolve(cls, configured: Any, defaults: Any) -> Thresholds:
        """A station's thresholds: its config's values, the model card's defaults where unset."""
        return cls(
            image=float(defaults.image if configured.image is None else configured.image),
            pixel=float(defaults.pixel if configured.pixel is None else configured.pixel),
            min_area_px=int(configured.min_area_px),
        )


@dataclass(slots=True)
class Decision:
    """What the pipeline concluded about one frame (`score_map`: model input, or the stitched
    ROI canvas when tiled)."""

    defective: bool
    image_score: float
    regions: list[Region]
    thresholds: Thresholds
    score_map: np.ndarray
    roi: Box
    frame_size: tuple[int, int]  # width, height
    shadow_defective: bool | None = None
    shadow_thresholds: Thresholds | None = None
    infer_s: float = 0.0  # time in the engine (for the inference-latency histogram)
    tile_scores: np.ndarray | None = None  # tiled: each tile's raw image score, row-major
    extras: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """One station's fixed-prompt inference and decision logic (see module docstring)."""

    def __init__(
        self,
        engine: Any,
        prompt_rgb: np.ndarray,
        *,
        thresholds: Thresholds,
        roi: tuple[float, float, float, float] | None = None,
        ignore_masks: list | tuple = (),
        require_region: bool = True,
        tiling: TilingConfig | None = None,
    ) -> None:
        self.engine = engine
        card = engine.card
        self.input_hw = (int(card.input_size[0]), int(card.input_size[1]))
        self.bgr = getattr(card, "color_order", "RGB") == "BGR"
        norm = card.score_normalization
        self._img_c, self._img_s = float(norm.image.center), float(norm.image.scale)
        self._pix_c, self._pix_s = float(norm.pixel.center), float(norm.pixel.scale)
        # fixed per station: float32 constants, so the per-frame maths never re-converts them
        self._pix_c32, self._pix_s32 = np.float32(self._pix_c), np.float32(self._pix_s)
        if getattr(card, "resize", "cv2-area") not in ("cv2-area", "area"):
            log.warning("model resizes with %r; the runtime uses cv2 INTER_AREA", card.resize)
        self.roi = None if roi is None else tuple(float(v) for v in roi)
        self.ignore_masks = [list(p) for p in ignore_masks]
        self.require_region = require_region
        self._lock = threading.Lock()
        self._thresholds = thresholds
        self._shadow: Thresholds | None = None
        self.tiling = tiling
        self.tile_prompt_size: tuple[int, int] | None = None  # frame (w, h) of per-tile tokens
        # per frame size, computed once (never per frame): ROI box, ignore mask, its complement,
        # tile grid (tiled only)
        self._geometry: dict[tuple[int, int], Geometry] = {}
        self._tile_tokens: dict[int, np.ndarray] = {}  # tiles per frame -> tokens for them
        self._rulers: tuple[np.ndarray, np.ndarray] | None = None  # per-position (c, s)
        if tiling is None:
            prompt_input, _ = self.prepare(prompt_rgb)
            self.tokens = engine.encode_prompt(prompt_input)
        else:
            self._check_tile_input()
            crop, roi = self._crop(prompt_rgb)
            grid = self._frame_geometry(prompt_rgb.shape[1], prompt_rgb.shape[0])[3]
            self.map_hw = grid.canvas_hw
            self.tokens = prompt_tokens(engine, crop, grid, tiling.prompt)
            if tiling.prompt == "per-tile":
                self.tile_prompt_size = (int(prompt_rgb.shape[1]), int(prompt_rgb.shape[0]))
            if tiling.position_norm is not None:
                self._rulers = position_arrays([p.model_dump() for p in tiling.position_norm])
                if tiling.prompt == "per-tile" and len(self._rulers[0]) != grid.n:
                    raise ValueError(
                        f"tiling.position_norm holds {len(self._rulers[0])} positions but the "
                        f"golden sample's grid has {grid.n} tiles; re-run `lineguard calibrate "
                        "--positions`"
                    )
        self.check_area(thresholds.min_area_px)

    # ------------------------------------------------------------------ thresholds
    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    @property
    def shadow(self) -> Thresholds | None:
        return self._shadow

    def set_thresholds(
        self,
        image: float | None = None,
        pixel: float | None = None,
        min_area_px: int | None = None,
    ) -> Thresholds:
        """Change any of the thresholds; the rest keep their value. Applies from the next frame."""
        with self._lock:
            t = self._thresholds
            self._thresholds = replace(
                t,
                image=t.image if image is None else check_score("image", image),
                pixel=t.pixel if pixel is None else check_score("pixel", pixel),
                min_area_px=t.min_area_px if min_area_px is None else self.check_area(min_area_px),
            )
            return self._thresholds

    @property
    def max_area_px(self) -> int:
        """Pixels of the anomaly map (tiled: of the golden sample's stitched map): a larger
        `min_area_px` could never alert."""
        h, w = self.map_hw if self.tiling is not None else self.input_hw
        return h * w

    def check_area(self, value: int) -> int:
        value = check_area("min_area_px", value)
        if value > self.max_area_px:
            raise ValueError(
                f"min_area_px: must be <= {self.max_area_px}, the anomaly map's pixels "
                "(else nothing alerts)"
            )
        return value

    def set_shadow(self, thresholds: Thresholds | None) -> None:
        """Evaluate a candidate too (counted, never alerted); None stops shadow evaluation."""
        with self._lock:
            self._shadow = thresholds

    # ------------------------------------------------------------------ processing
    def _check_tile_input(self) -> None:
        ih, iw = self.input_hw
        if ih != iw:
            raise ValueError(f"tiling needs a square model input, the model takes {iw}x{ih}")

    def _frame_geometry(self, width: int, height: int) -> Geometry:
        key = (width, height)
        geo = self._geometry.get(key)
        if geo is None:
            roi = roi_pixels(self.roi, width, height)
            grid = None
            map_hw = self.input_hw
            if self.tiling is not None:
                t = self.tiling
                grid = make_grid(roi[2], roi[3], self.input_hw[0], t.scale, t.overlap)
                if grid.n > t.max_tiles:
                    raise ValueError(
                        f"tiling: a {width}x{height} frame needs {grid.n} tiles at scale "
                        f"{t.scale:g}, more than max_tiles {t.max_tiles}; raise the scale"
                    )
                map_hw = grid.canvas_hw
            polys = polygons_to_pixels(self.ignore_masks, width, height)
            ignore = ignore_mask(polys, roi, map_hw)
            geo = (roi, ignore, None if ignore is None else ~ignore, grid)
            self._geometry = {**self._geometry, key: geo}
        return geo

    def map_shape(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the score map for a frame of this size (model input, or tiled canvas)."""
        grid = self._frame_geometry(width, height)[3]
        return self.input_hw if grid is None else grid.canvas_hw

    def _crop(self, rgb: np.ndarray) -> tuple[np.ndarray, Box]:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 H×W×3, got {rgb.dtype} {rgb.shape}")
        roi = self._frame_geometry(rgb.shape[1], rgb.shape[0])[0]
        x, y, w, h = roi
        crop = rgb[y : y + h, x : x + w]
        return (np.ascontiguousarray(crop[..., ::-1]) if self.bgr else crop), roi

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, Box]:
        """ROI crop resized to the model input (uint8 H×W×3 in the model's colour order)."""
        crop, roi = self._crop(rgb)
        ih, iw = self.input_hw
        if crop.shape[:2] != (ih, iw):
            crop = cv2.resize(crop, (iw, ih), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(crop), roi

    def prepare_tiles(self, rgb: np.ndarray) -> tuple[np.ndarray, Box, Grid]:
        """The ROI at the tiling scale cut into N×T×T×3 tiles (model colour order)."""
        crop, roi = self._crop(rgb)
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        if self.tile_prompt_size is not None and size != self.tile_prompt_size:
            ps = self.tile_prompt_size
            raise ValueError(
                f"frame is {size[0]}x{size[1]} but per-tile prompts were cut from a "
                f"{ps[0]}x{ps[1]} golden sample; use a golden sample from this camera "
                "(or tiling.prompt: shared)"
            )
        grid = self._frame_geometry(rgb.shape[1], rgb.shape[0])[3]
        assert grid is not None
        return cut(to_canvas(crop, grid), grid), roi, grid

    def _infer(self, rgb: np.ndarray) -> tuple[np.ndarray, float, Box, float, np.ndarray | None]:
        """(raw map at map size, raw image score, ROI box, seconds in the engine, raw tile
        scores or None) for one frame. The raw map may be a view of the engine's output buffer
        (valid until its next call). Tiled with per-position rulers, the image score is the
        ruled max carried back to the model's raw units, so the one normalisation after it
        yields the ruled score."""
        if self.tiling is None:
            model_input, roi = self.prepare(rgb)
            t0 = time.perf_counter()
            raw_map, raw_score = self.engine.detect(model_input, self.tokens)
            infer_s = time.perf_counter() - t0
            m = np.asarray(raw_map, np.float32)
            m = m.reshape(m.shape[-2], m.shape[-1])
            ih, iw = self.input_hw
            if m.shape != (ih, iw):
                m = cv2.resize(m, (iw, ih), interpolation=cv2.INTER_LINEAR)
            return m, float(np.asarray(raw_score).reshape(-1)[0]), roi, infer_s, None
        tiles, roi, grid = self.prepare_tiles(rgb)
        tokens = self._tokens_for(grid.n)
        t0 = time.perf_counter()
        maps, scores = detect_tiles(self.engine, tiles, tokens)  # one batched call where it can
        infer_s = time.perf_counter() - t0
        if self._rulers is None:
            score = float(scores.max())
        else:
            score = self._img_c + self._img_s * ruled_max(scores, *self._rulers)
        return stitch(maps, grid), score, roi, infer_s, scores

    def _tokens_for(self, n: int) -> np.ndarray:
        """Tokens for `n` tiles: the per-position tokens, or (shared prompt on a frame size other
        than the golden sample's) the first repeated, built once per tile count so the engine
        sees the same array every frame (a shared engine binds it once)."""
        tokens = self.tokens
        if len(tokens) == n:
            return tokens
        cached = self._tile_tokens.get(n)
        if cached is None:
            cached = np.ascontiguousarray(np.repeat(tokens[:1], n, axis=0))
            self._tile_tokens = {**self._tile_tokens, n: cached}
        return cached

    def process(self, rgb: np.ndarray) -> Decision:
        """Run the model on one frame and decide (thresholds read once, at the start)."""
        thresholds, shadow = self._thresholds, self._shadow
        raw_map, raw_score, roi, infer_s, tile_scores = self._infer(rgb)
        score_map = self._normalise_map(raw_map)
        score = (raw_score - self._img_c) / self._img_s
        _, ignore, keep, _ = self._frame_geometry(rgb.shape[1], rgb.shape[0])
        if ignore is not None:
            np.copyto(score_map, np.float32(0.0), where=ignore)
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        regions = self._regions(score_map, score, thresholds, roi, size, keep)
        decision = Decision(
            defective=self._defective(score, regions, thresholds),
            image_score=score,
            regions=regions,
            thresholds=thresholds,
            score_map=score_map,
            roi=roi,
            frame_size=size,
            infer_s=infer_s,
            tile_scores=tile_scores,
        )
        if shadow is not None:
            shadow_regions = self._regions(score_map, score, shadow, roi, size, keep)
            decision.shadow_defective = self._defective(score, shadow_regions, shadow)
            decision.shadow_thresholds = shadow
        return decision

    def _normalise_map(self, raw_map: np.ndarray) -> np.ndarray:
        """(raw - center) / scale into ONE new float32 array (the engine's buffer may be reused
        by its next frame); the same arithmetic, bit for bit, as the expression form."""
        m = np.asarray(raw_map, np.float32)
        out = np.subtract(m, self._pix_c32, dtype=np.float32)
        return np.divide(out, self._pix_s32, out=out)

    def _regions(self, score_map, score, t: Thresholds, roi, size, keep) -> list[Region]:
        if score < t.image:
            return []  # the frame is normal whatever the map says; skip the labelling work
        return find_regions(score_map, t.pixel, t.min_area_px, roi, size, keep=keep)

    def _defective(self, score: float, regions: list[Region], t: Thresholds) -> bool:
        return score >= t.image and (bool(regions) or not self.require_region)


class Debouncer:
    """Turns per-frame decisions into events.

    Rule: count consecutive defective frames (a normal frame resets the count). An event fires on
    a frame where the count has reached `consecutive` and at least `cooldown_s` have passed since
    the previous event (capture-time clock); the count then restarts from zero. So a persisting
    defect re-alerts at most once per `cooldown_s`, and every `consecutive` frames at the most;
    a run that reached `consecutive` during the cooldown fires on its first frame after it.
    """

    def __init__(self, consecutive: int = 1, cooldown_s: float = 0.0) -> None:
        if consecutive < 1 or cooldown_s < 0:
            raise ValueError("need consecutive >= 1 and cooldown_s >= 0")
        self.consecutive = consecutive
        self.cooldown_s = cooldown_s
        self.run = 0
        self._last_event: float | None = None

    def update(self, defective: bool, t: float) -> bool:
        """Feed one decision made on a frame captured at monotonic time `t`; True = emit."""
        if not defective:
            self.run = 0
            return False
        self.run += 1
        if self.run < self.consecutive:
            return False
        if self._last_event is not None and t - self._last_event < self.cooldown_s:
            return False
        self._last_event = t
        self.run = 0
        return True
