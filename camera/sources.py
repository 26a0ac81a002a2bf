"""Frame sources: thin adapters that open a device/stream/file/folder and read one image at a time.

A source knows nothing about threads, pacing or reconnects (`camera.reader.Camera` does that). Its
contract is small so new kinds are easy to add:

- `open()` raises `CameraError` when the source is not available (reader retries with backoff);
- `read()` returns RGB uint8 H×W×3, returns None at the normal end of a finite source (video or
  folder without `loop`), and raises `CameraError` when the source broke (reader reconnects);
- `close()` never raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from lineguard.camera.errors import CameraError
from lineguard.camera.frame import read_image, to_rgb_u8

log = logging.getLogger(__name__)


class FrameSource:
    """Base class; see the module docstring for the contract."""

    #: Files replay as fast as they are read unless paced; live sources pace themselves.
    is_file: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file handle (default: nothing to release)."""

    def describe(self) -> str:
        return self.name


class OpenCVSource(FrameSource):
    """cv2.VideoCapture on a device index, a network URL (FFmpeg) or a video file."""

    def __init__(
        self,
        target: int | str,
        *,
        name: str,
        is_file: bool = False,
        loop: bool = False,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__(name)
        self.target = target
        self.is_file = is_file
        self.loop = loop
        self.width, self.height, self.fps = width, height, fps
        self.timeout_ms = int(max(timeout_s, 0.5) * 1000)
        self._cap: cv2.VideoCapture | None = None
        self._frames_this_pass = 0

    def open(self) -> None:
        self.close()
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target)
            if cap.isOpened():
                # Requests only: a camera may silently pick the nearest mode it supports.
                if self.width:
                    cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                if self.height:
                    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
                if self.fps:
                    cap.set(cv2.CAP_PROP_FPS, self.fps)
        elif self.is_file:
            if not Path(self.target).is_file():
                raise CameraError(f"{self.name}: video file not found: {self.target}")
            cap = cv2.VideoCapture(str(self.target))
        else:
            # Timeouts so a dead RTSP server cannot block the reader forever (FFmpeg backend).
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                self.timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                self.timeout_ms,
            ]
            cap = cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{self.name}: cannot open {self.describe()}")
        self._cap = cap
        self._frames_this_pass = 0

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            raise CameraError(f"{self.name}: not open")
        ok, image = self._cap.read()
        if ok and image is not None:
            self._frames_this_pass += 1
            return to_rgb_u8(image, "BGR")
        if not self.is_file:
            raise CameraError(f"{self.name}: no frame from {self.describe()}")
        if self._frames_this_pass == 0:
            raise CameraError(f"{self.name}: video has no decodable frame: {self.target}")
        if not self.loop:
            return None
        self.open()  # rewind by reopening: seeking is unreliable on some containers
        return self.read()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        if isinstance(self.target, int):
            return f"device {self.target}"
        return _redact(str(self.target))


def _redact(url: str) -> str:
    """Hide a password in rtsp://user:pass@host URLs so it never reaches logs or MQTT status."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.split("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


class FolderSource(FrameSource):
    """Replays the images of a folder in sorted name order (any extension OpenCV decodes).

    The listing is taken at open and again at each loop, so files added meanwhile are picked up.
    A file that disappears mid-pass, or a folder that is removed or emptied, is a broken source
    (the reader reconnects and the camera is reported lost): a folder stands in for a camera.
    Files OpenCV cannot decode (or refuses, e.g. a header claiming 100000×100000 pixels) are
    skipped with one warning each.
    """

    is_file = True

    def __init__(self, path: str | os.PathLike, *, name: str, loop: bool = False) -> None:
        super().__init__(name)
        self.path = Path(path)
        self.loop = loop
        self._files: list[Path] = []
        self._pos = 0
        self._skipped: set[str] = set()

    def _list(self) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            raise CameraError(f"{self.name}: cannot list folder {self.path}: {exc}") from None
        files = [
            Path(e.path)
            for e in entries
            if not e.name.startswith(".") and e.is_file() and e.name not in self._skipped
        ]
        if not files:
            raise CameraError(f"{self.name}: no images in folder {self.path}")
        return files

    def open(self) -> None:
        self._files = self._list()
        self._pos = 0

    def read(self) -> np.ndarray | None:
        while True:
            if self._pos >= len(self._files):
                if not self.loop:
                    return None
                self.open()
            path = self._files[self._pos]
            self._pos += 1
            if not path.is_file():
                raise CameraError(f"{self.name}: image disappeared: {path}")
            image, why = read_image(str(path))
            if image is not None:
                return to_rgb_u8(image, "BGR")
            if not path.is_file():
                raise CameraError(f"{self.name}: image disappeared: {path}")
            if path.name not in self._skipped:
                log.warning("%s: skipping %s (%s)", self.name, path, why)
                self._skipped.add(path.name)
            if all(p.name in self._skipped for p in self._files):
                raise CameraError(f"{self.name}: no decodable images in folder {self.path}")

    def describe(self) -> str:
        return f"folder {self.path}"
