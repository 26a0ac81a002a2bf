"""Issue 14, finding 8: a folder camera whose first file is a PNG whose header claims
100000×100000 pixels never yielded a frame (`cv2.imread` raises on CV_IO_MAX_IMAGE_PIXELS and
the station reported camera-lost). Such a file is now skipped with a warning, like any file
OpenCV cannot decode."""

from __future__ import annotations

import logging
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from lineguard.camera import FolderSource, decode_image, open_camera


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny file whose IHDR claims `width`×`height` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a_huge.png").write_bytes(huge_png())
    rgb = np.full((16, 16, 3), 77, np.uint8)
    cv2.imwrite(str(folder / "b_ok.png"), rgb)
    return folder


def test_decode_image_refuses_a_huge_header_without_raising():
    image, why = decode_image(huge_png())
    assert image is None and why


def test_folder_skips_the_huge_png_with_a_warning(tmp_path, caplog):
    src = FolderSource(_folder(tmp_path), name="st1")
    src.open()
    with caplog.at_level(logging.WARNING, logger="lineguard.camera.sources"):
        frame = src.read()
    assert frame is not None and frame.shape == (16, 16, 3) and int(frame[0, 0, 0]) == 77
    assert any("a_huge.png" in r.getMessage() for r in caplog.records)
    assert src.read() is None  # end of the folder, not an error


def test_camera_with_a_huge_png_first_is_not_lost(tmp_path):
    cfg = SimpleNamespace(
        kind="folder",
        index=None,
        url=None,
        path=_folder(tmp_path),
        fps=None,
        loop=True,
        width=None,
        height=None,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        lost_after_s=0.5,
    )
    frames: list = []
    lost: list = []
    cam = open_camera(cfg, name="st1", on_frame=frames.append, on_lost=lost.append)
    with cam:
        deadline = time.monotonic() + 5
        while len(frames) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(frames) >= 3 and not lost
