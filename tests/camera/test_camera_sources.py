"""Frame sources: folder replay (order, pacing, loop, formats), video files, factory, GenICam."""

from __future__ import annotations

import importlib.util
import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from lineguard.camera import Camera, CameraError, FolderSource, open_camera, open_source
from lineguard.camera.errors import CameraConfigError
from lineguard.camera.genicam import component_to_rgb


def _write_folder(folder: Path, n: int, size=(24, 32)) -> list[int]:
    """n images whose red channel encodes their index; names sort in index order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = np.zeros((*size, 3), np.uint8)
        rgb[..., 0] = 10 * (i + 1)
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return [10 * (i + 1) for i in range(n)]


def _cfg(**kw) -> SimpleNamespace:
    base = dict(
        kind="folder",
        index=None,
        url=None,
        path=None,
        fps=None,
        loop=False,
        width=None,
        height=None,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        lost_after_s=0.5,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _collect(cam: Camera, frames: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cam.ended and time.monotonic() < deadline:
        time.sleep(0.01)


def test_folder_replays_sorted_rgb_with_increasing_ids(tmp_path):
    reds = _write_folder(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # skipped, sorts last
    frames = []
    cam = open_camera(_cfg(path=tmp_path / "imgs"), name="st1", on_frame=frames.append)
    with cam:
        _collect(cam, frames)
    assert cam.ended and not cam.lost
    assert [f.frame_id for f in frames] == list(range(5))
    assert [int(f.image[0, 0, 0]) for f in frames] == reds  # red stays red: RGB order
    assert all(f.image.shape == (24, 32, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.source == "st1" for f in frames)
    assert all(a.monotonic <= b.monotonic for a, b in itertools.pairwise(frames))


def test_folder_any_extension_and_grayscale_to_three_channels(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    gray = np.full((10, 12), 77, np.uint8)
    cv2.imwrite(str(folder / "a.bmp"), gray)
    cv2.imwrite(str(folder / "b.jpg"), np.full((10, 12, 3), 128, np.uint8))
    deep = np.full((10, 12), 257 * 200, np.uint16)
    cv2.imwrite(str(folder / "c.tiff"), deep)
    src = FolderSource(folder, name="x")
    src.open()
    images = [src.read() for _ in range(3)]
    assert src.read() is None
    assert all(im.shape == (10, 12, 3) and im.dtype == np.uint8 for im in images)
    assert (images[0] == 77).all()
    assert abs(int(images[1][5, 5, 0]) - 128) <= 2
    assert (images[2] == 200).all()


def test_folder_paced_at_fps_is_not_faster_than_asked(tmp_path):
    _write_folder(tmp_path / "imgs", 6)
    frames = []
    fps = 20.0
    cam = open_camera(_cfg(path=tmp_path / "imgs", fps=fps), on_frame=frames.append)
    with cam:
        _collect(cam, frames)
    assert len(frames) == 6
    spread = frames[-1].monotonic - frames[0].monotonic
    # Lower bound only: pacing must hold frames back; a slow machine may only be slower.
    assert spread >= 5 / fps * 0.9


def test_slow_pacing_is_not_camera_loss(tmp_path):
    _write_folder(tmp_path / "imgs", 6)
    frames = []
    with open_camera(_cfg(path=tmp_path / "imgs", fps=1.0), on_frame=frames.append) as cam:
        time.sleep(0.3)
    assert len(frames) == 1  # at 1 fps only the first frame is due within 0.3 s
    assert not cam.lost  # waiting for pacing is not "no frame from the camera"


def test_folder_loop_repeats_in_order_and_ids_keep_counting(tmp_path):
    reds = _write_folder(tmp_path / "imgs", 3)
    frames = []
    cam = open_camera(_cfg(path=tmp_path / "imgs", loop=True), on_frame=frames.append)
    with cam:
        deadline = time.monotonic() + 10
        while len(frames) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(frames) >= 8
    assert [f.frame_id for f in frames[:8]] == list(range(8))
    assert [int(f.image[0, 0, 0]) for f in frames[:8]] == (reds * 3)[:8]
    assert not cam.ended


def _write_video(path: Path, n: int, size=(48, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size[::-1])
    assert writer.isOpened()
    for i in range(n):
        rgb = np.zeros((*size, 3), np.uint8)
        rgb[..., 2] = 20 * (i + 1)  # blue ramp
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_file_source_reads_all_frames_then_ends(tmp_path):
    video = tmp_path / "clip.avi"
    _write_video(video, 7)
    frames, ended = [], []
    cam = open_camera(
        _cfg(kind="video", path=video), on_frame=frames.append, on_end=lambda: ended.append(1)
    )
    with cam:
        _collect(cam, frames)
    assert ended == [1]
    assert [f.frame_id for f in frames] == list(range(7))
    assert all(f.image.shape == (48, 64, 3) for f in frames)
    blues = [int(f.image[24, 32, 2]) for f in frames]
    assert blues == sorted(blues) and abs(blues[0] - 20) < 10 and abs(blues[-1] - 140) < 10
    assert int(frames[0].image[24, 32, 0]) < 10  # RGB order: no blue leaking into red


def test_video_file_loops(tmp_path):
    video = tmp_path / "clip.avi"
    _write_video(video, 3)
    frames = []
    with open_camera(_cfg(kind="video", path=video, loop=True), on_frame=frames.append):
        deadline = time.monotonic() + 10
        while len(frames) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(frames) >= 7
    blues = [int(f.image[24, 32, 2]) for f in frames[:7]]
    assert blues[3] < blues[2] and abs(blues[3] - blues[0]) < 5  # rewound


def test_missing_video_is_lost_not_a_crash(tmp_path):
    lost = []
    cam = open_camera(_cfg(kind="video", path=tmp_path / "nope.avi"), on_lost=lost.append)
    with cam:
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
    assert cam.lost and "not found" in lost[0]


def test_factory_rejects_unknown_kind_and_missing_fields():
    with pytest.raises(CameraConfigError, match="unknown camera kind"):
        open_source(_cfg(kind="webcam"))
    with pytest.raises(CameraConfigError, match="needs 'url'"):
        open_source(_cfg(kind="stream"))


def test_stream_url_password_is_redacted():
    src = open_source(_cfg(kind="stream", url="rtsp://op:s3cret@10.0.0.5:554/live"), "cam")
    assert "s3cret" not in src.describe() and "op:***@10.0.0.5" in src.describe()


def test_stream_that_cannot_connect_raises_camera_error():
    src = open_source(_cfg(kind="stream", url="rtsp://127.0.0.1:9/none", lost_after_s=1.0))
    with pytest.raises(CameraError, match="cannot open"):
        src.open()


@pytest.mark.skipif(
    importlib.util.find_spec("harvesters") is not None, reason="harvesters is installed"
)
def test_genicam_without_harvesters_says_what_to_install(tmp_path):
    with pytest.raises(CameraConfigError, match=r"pip install 'lineguard\[genicam\]'"):
        open_camera(_cfg(kind="genicam", path=tmp_path / "producer.cti", index=0))


def test_genicam_pixel_formats_convert_to_rgb():
    mono = np.arange(12, dtype=np.uint8)
    out = component_to_rgb(mono, 4, 3, "Mono8")
    assert out.shape == (3, 4, 3) and (out[..., 0] == mono.reshape(3, 4)).all()
    bgr = np.tile(np.array([1, 2, 3], np.uint8), 6)
    assert component_to_rgb(bgr, 3, 2, "BGR8")[0, 0].tolist() == [3, 2, 1]
    rggb = np.zeros((8, 8), np.uint8)
    rggb[0::2, 0::2] = 200  # only red sites lit
    rgb = component_to_rgb(rggb.ravel(), 8, 8, "BayerRG8")
    assert rgb[4, 4].tolist() == [200, 0, 0]
    mono12 = np.full(6, 4095, np.uint16)
    assert (component_to_rgb(mono12, 3, 2, "Mono12") == 255).all()
