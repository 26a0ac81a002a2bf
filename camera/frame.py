"""The unit that flows from a camera to a station: one RGB image with its identity and time.

Both clocks are stamped at capture: `timestamp` (wall clock, for event payloads and operators) and
`monotonic` (for latency and debounce, immune to NTP steps). `frame_id` increases by one per frame
delivered by a `Camera` and keeps counting across reconnects, so gaps never hide a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image. `image` is RGB uint8 H×W×3 (the project's image convention)."""

    frame_id: int
    timestamp: float
    monotonic: float
    image: np.ndarray
    source: str

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def to_rgb_u8(image: np.ndarray, order: str = "BGR") -> np.ndarray:
    """Convert what a decoder returns (gray, BGR, BGRA, 16-bit) to contiguous RGB uint8 H×W×3.

    `order` is the channel order of 3/4-channel input: OpenCV decoders give "BGR", GenICam "RGB".
    16-bit images are scaled by 1/257 (full range to full range) rather than clipped.
    """
    if image is None or image.size == 0:
        raise ValueError("empty image")
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            image = np.clip(image * 255.0 if image.max() <= 1.0 else image, 0, 255)
        image = image.astype(np.uint8)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"unsupported image shape {image.shape}")
    if image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB if order == "BGR" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    if order == "BGR":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def decode_image(data: bytes) -> tuple[np.ndarray | None, str]:
    """Decode an encoded image (PNG, JPEG, ...) as OpenCV's BGR(A)/gray array.

    Returns (image, "") or (None, why). Never raises on bad input: OpenCV raises (instead of
    returning None) for a header that claims more pixels than `CV_IO_MAX_IMAGE_PIXELS`, e.g. a
    100000×100000 PNG of a few bytes; that is a bad file, not a broken camera.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        return None, "empty file"
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "OpenCV error"
        return None, f"OpenCV refused it: {reason[:200]}"
    if image is None:
        return None, "not an image OpenCV can decode"
    return image, ""


def read_image(path: str) -> tuple[np.ndarray | None, str]:
    """`decode_image` of a file; an unreadable file is (None, why)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    return decode_image(data)
