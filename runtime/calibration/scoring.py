"""Score frames through a station's exact pipeline for calibration.

The scorer builds the same `Pipeline` a running `Station` builds (same artifact, engine,
precision, prompt image and sha256 check, ROI, ignore masks, normalisation), so a threshold fitted
on these scores means the same thing at run time. Frames come from a folder (read by the camera
stage's `FolderSource`, as a folder camera would) or from the station's own camera.

Per frame it records the image score, the frame's **region score** — the largest pixel threshold
at which the frame still has a region of at least `min_area_px` map pixels outside the ignore
masks (so the pipeline's decision at thresholds (T, p) is exactly `image ≥ T and region ≥ p`) —
and, for normal frames, the frame's largest pixel scores (`PixelTail`) for the pixel threshold.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.runtime.calibration.pixel import PixelTail
from lineguard.runtime.config import StationConfig
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.regions import find_regions, ignore_mask, polygons_to_pixels

log = logging.getLogger(__name__)


@dataclass
class ScoreSet:
    """Scores of one set of frames (normal or defective)."""

    names: list[str] = field(default_factory=list)
    image: list[float] = field(default_factory=list)
    region: list[float] = field(default_factory=list)
    pixels: PixelTail | None = None
    tiles: list[np.ndarray] = field(default_factory=list)  # tiled: raw score of every tile

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.image, np.float64), np.asarray(self.region, np.float64)

    def decision_scores(self, pixel_threshold: float, require_region: bool = True) -> np.ndarray:
        """Image scores of frames that would alert at this pixel threshold; -inf for the others
        (so `decision_scores ≥ T` is the pipeline's decision at image threshold T)."""
        image, region = self.arrays()
        if not require_region:
            return image
        return np.where(region >= pixel_threshold, image, -np.inf)

    def __len__(self) -> int:
        return len(self.image)


def region_score(
    score_map: np.ndarray, min_area_px: int, ignore: np.ndarray | None, roi, frame_size
) -> float:
    """Largest pixel threshold p such that `find_regions(score_map, p, min_area_px, …)` finds a
    region (binary search over the map's values; existence is monotone in p); -inf if none."""
    valid = score_map if ignore is None else score_map[~ignore]
    values = np.unique(valid.ravel())[::-1]  # descending, distinct
    if values.size == 0:
        return -np.inf

    def has_region(p: float) -> bool:
        return bool(find_regions(score_map, p, min_area_px, roi, frame_size, ignore))

    lo, hi = 0, values.size - 1  # find the smallest index i with has_region(values[i])
    if not has_region(values[hi]):
        return -np.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if has_region(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


class StationScorer:
    """A station's pipeline, built like `Station` builds it, used to score calibration frames."""

    def __init__(self, cfg: StationConfig, engine: Any | None = None) -> None:
        from lineguard.runtime.station import read_prompt  # the station's own prompt checks

        self.cfg = cfg
        prompt, self.prompt_sha256 = read_prompt(cfg.prompt.image, cfg.prompt.sha256)
        self._owns_engine = engine is None
        if engine is None:
            from lineguard.runtime.engine import load_engine

            engine = load_engine(
                cfg.model, backend=cfg.engine, precision=cfg.precision, threads=cfg.threads
            )
        self.engine = engine
        self.active = Thresholds.resolve(cfg.thresholds, engine.card.thresholds)
        try:
            self.pipeline = Pipeline(
                engine,
                prompt,
                thresholds=self.active,
                roi=cfg.roi,
                ignore_masks=cfg.ignore_masks,
                tiling=cfg.tiling,
            )
        except ValueError as exc:  # as a station reports it
            self.close()
            raise LineGuardError(f"station {cfg.station_id}: {exc}") from exc
        self._ignore: dict[tuple[int, int], np.ndarray | None] = {}

    def close(self) -> None:
        if self._owns_engine and hasattr(self.engine, "close"):
            self.engine.close()
            self._owns_engine = False

    def _ignore_mask(self, decision) -> np.ndarray | None:
        key = decision.frame_size
        if key not in self._ignore:
            polys = polygons_to_pixels(self.pipeline.ignore_masks, *key)
            self._ignore[key] = ignore_mask(polys, decision.roi, self.pipeline.map_shape(*key))
        return self._ignore[key]

    def score(self, rgb: np.ndarray, into: ScoreSet, name: str = "") -> None:
        """Run one frame through the pipeline and append its scores to `into`."""
        decision = self.pipeline.process(rgb)
        ignore = self._ignore_mask(decision)
        smap = decision.score_map
        into.names.append(name)
        into.image.append(float(decision.image_score))
        if decision.tile_scores is not None:
            into.tiles.append(np.array(decision.tile_scores, np.float64))
        into.region.append(
            region_score(smap, self.active.min_area_px, ignore, decision.roi, decision.frame_size)
        )
        if into.pixels is not None:
            into.pixels.add(smap, None if ignore is None else ~ignore)

    def score_all(
        self, frames: Iterator[tuple[str, np.ndarray]], keep_pixels: bool, label: str
    ) -> ScoreSet:
        from tqdm import tqdm

        out = ScoreSet(pixels=PixelTail() if keep_pixels else None)
        for name, rgb in tqdm(frames, desc=f"scoring {label}", unit="frame", leave=False):
            self.score(rgb, out, name)
        return out


# ---------------------------------------------------------------------------- frame sources


def folder_frames(path: str | Path, recursive: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Images of a folder in name order, decoded as a folder camera decodes them (OpenCV, then
    `camera.to_rgb_u8`); with `recursive`, sub-folders too (e.g. MVTec `test/<defect type>/`).
    Files OpenCV cannot decode are skipped with a warning."""
    from lineguard.camera import read_image, to_rgb_u8

    root = Path(path)
    if not root.is_dir():
        raise LineGuardError(f"{root}: not a folder")
    if recursive:
        files = sorted(
            Path(d) / f for d, _, names in os.walk(root) for f in names if not f.startswith(".")
        )
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    found = False
    for file in files:
        image, why = read_image(str(file))
        if image is None:
            log.warning("skipping %s (%s)", file, why)
            continue
        found = True
        yield file.relative_to(root).as_posix(), to_rgb_u8(image, "BGR")
    if not found:
        raise LineGuardError(f"{root}: no images found")


def camera_frames(
    cfg: StationConfig, count: int, every: int = 1, timeout_s: float = 60.0
) -> Iterator[tuple[str, np.ndarray]]:
    """`count` frames from the station's own camera (every `every`-th one), as `Station` reads
    it; fails when the camera is lost or delivers nothing for `timeout_s`."""
    from lineguard.camera import CameraConfigError, open_camera

    frames: queue.Queue = queue.Queue(maxsize=4)
    ended = []

    def put(frame) -> None:  # back pressure, but never blocks a stopping camera
        while not camera.stopping:
            try:
                frames.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        camera = open_camera(
            cfg.camera,
            name=f"calibrate-{cfg.station_id}",
            on_frame=put,
            on_end=lambda: ended.append(True),
        )
    except CameraConfigError as exc:
        raise LineGuardError(f"station {cfg.station_id}: camera: {exc}") from exc
    camera.start()
    try:
        got = seen = 0
        deadline = time.monotonic() + timeout_s
        while got < count:
            try:
                frame = frames.get(timeout=0.2)
            except queue.Empty:
                if ended and frames.empty():
                    raise LineGuardError(
                        f"camera of {cfg.station_id} ended after {got} of {count} frames"
                    ) from None
                if time.monotonic() > deadline:
                    why = camera.last_error or "no frame"
                    raise LineGuardError(
                        f"camera of {cfg.station_id}: {why} (got {got} of {count} frames "
                        f"in {timeout_s:.0f} s)"
                    ) from None
                continue
            deadline = time.monotonic() + timeout_s
            seen += 1
            if (seen - 1) % every:
                continue
            got += 1
            yield f"frame-{frame.frame_id}", frame.image
    finally:
        camera.stop()
