"""Evidence for an event: a small JPEG (frame + heat map + region boxes), bounded in bytes, and an
optional on-disk store with retention.

Why bounded: the JPEG travels on MQTT next to the event (architecture.md: never a raw frame in the
JSON) and sits on edge disks for days; an operator needs to see *where* the defect is, not every
pixel.
`encode_bounded` lowers the JPEG quality, then the size, until the bytes fit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lineguard.runtime.regions import Box, Region

log = logging.getLogger(__name__)

QUALITIES = (85, 70, 55, 40, 30)
MIN_SIDE = 32


def render_overlay(
    frame_rgb: np.ndarray,
    score_map: np.ndarray,
    roi: Box,
    regions: Sequence[Region],
    pixel_threshold: float,
    *,
    image_score: float | None = None,
    max_side: int = 640,
) -> np.ndarray:
    """BGR image: the frame (scaled to `max_side`), the normalised map blended over the ROI (more
    opaque and redder where scores approach and pass the pixel threshold), boxes around regions."""
    h, w = frame_rgb.shape[:2]
    f = min(1.0, max_side / max(h, w))
    out = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
    if f < 1.0:
        out = cv2.resize(out, (max(1, round(w * f)), max(1, round(h * f))), cv2.INTER_AREA)
    rx, ry, rw, rh = (round(v * f) for v in roi)
    rw = max(1, min(rw, out.shape[1] - rx))
    rh = max(1, min(rh, out.shape[0] - ry))
    scale = pixel_threshold if pixel_threshold > 0 else 1.0
    m = cv2.resize(score_map.astype(np.float32), (rw, rh), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(
        (np.clip(m / (2.0 * scale), 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET
    )
    alpha = (0.6 * np.clip(m / scale, 0.0, 1.0))[..., None]
    patch = out[ry : ry + rh, rx : rx + rw].astype(np.float32)
    out[ry : ry + rh, rx : rx + rw] = (patch * (1 - alpha) + heat * alpha).astype(np.uint8)
    if (rw, rh) != (out.shape[1], out.shape[0]):
        cv2.rectangle(out, (rx, ry), (rx + rw - 1, ry + rh - 1), (200, 200, 200), 1)
    thick = max(1, round(2 * max(out.shape[:2]) / 640))
    for r in regions:
        x, y, bw, bh = r.bbox
        p0 = (round(x * f), round(y * f))
        p1 = (max(p0[0] + 1, round((x + bw) * f) - 1), max(p0[1] + 1, round((y + bh) * f) - 1))
        cv2.rectangle(out, p0, p1, (0, 0, 255), thick)
    if image_score is not None:
        text = f"score {image_score:.2f}"
        cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3)
        cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    return out


def encode_bounded(image_bgr: np.ndarray, max_bytes: int) -> tuple[bytes, tuple[int, int]]:
    """JPEG of at most `max_bytes` and its (width, height): try qualities high to low, then shrink
    by 3/4 and retry.

    Raises ValueError only when even a MIN_SIDE-pixel thumbnail at the lowest quality is larger.
    """
    img = image_bgr
    while True:
        for q in QUALITIES:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and buf.size <= max_bytes:
                return buf.tobytes(), (int(img.shape[1]), int(img.shape[0]))
        h, w = img.shape[:2]
        if min(h, w) <= MIN_SIDE:
            raise ValueError(f"cannot fit a JPEG into {max_bytes} bytes")
        f = max(0.75, MIN_SIDE / min(h, w))  # never below MIN_SIDE, so the loop ends
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), cv2.INTER_AREA)


class EvidenceStore:
    """JPEGs on disk, one file per event, pruned by age and by count.

    Pruning lists the folder, so it runs at most every `prune_interval_s` (and on demand), not on
    every save. Files are written to a temp name and renamed, so a reader never sees half a JPEG.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        retention_days: float = 7.0,
        max_files: int | None = None,
        prune_interval_s: float = 60.0,
    ) -> None:
        self.root = Path(root)
        self.retention_s = retention_days * 86400.0
        self.max_files = max_files
        self.prune_interval_s = prune_interval_s
        self._last_prune = float("-inf")

    def save(self, name: str, data: bytes, now: float | None = None) -> Path:
        """Write `<root>/<name>.jpg` atomically and prune if due; returns the file path."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{name}.jpg"
        tmp = path.with_suffix(".jpg.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        now = time.time() if now is None else now
        if now - self._last_prune >= self.prune_interval_s:
            self.prune(now)
        return path

    def prune(self, now: float | None = None) -> int:
        """Delete JPEGs older than the retention and the oldest beyond `max_files`; count them."""
        now = time.time() if now is None else now
        self._last_prune = now
        try:
            entries = [e for e in os.scandir(self.root) if e.name.endswith(".jpg") and e.is_file()]
        except FileNotFoundError:
            return 0
        files = sorted(((e.stat().st_mtime, e.path) for e in entries), reverse=True)
        doomed = [p for mtime, p in files if now - mtime > self.retention_s]
        kept = [p for mtime, p in files if now - mtime <= self.retention_s]
        if self.max_files is not None and len(kept) > self.max_files:
            doomed += kept[self.max_files :]
        removed = 0
        for p in doomed:
            try:
                os.unlink(p)
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("evidence: removed %d old JPEG(s) from %s", removed, self.root)
        return removed
