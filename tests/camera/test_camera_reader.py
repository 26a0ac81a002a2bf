"""Reader thread: reconnect with backoff, the `lost` state and its callbacks, latest-frame get()."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from polling import wait_until

from lineguard.camera import Camera, CameraError, FrameSource, open_camera


def _wait(pred, timeout: float = 5.0) -> bool:
    return wait_until(pred, timeout, poll=0.01)


class _Cfg:
    kind = "folder"
    fps = 50.0
    loop = True
    reconnect_initial_s = 0.05
    reconnect_max_s = 0.2
    lost_after_s = 0.5

    def __init__(self, path: Path) -> None:
        self.path = path


def _folder(path: Path, n: int = 3) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(path / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    return path


def test_disappearing_folder_is_lost_then_recovered(tmp_path):
    folder = _folder(tmp_path / "cam")
    events: list[tuple[str, float]] = []
    frames = []
    cam = open_camera(
        _Cfg(folder),
        name="st",
        on_frame=frames.append,
        on_lost=lambda reason: events.append(("lost", time.monotonic(), reason)),
        on_recovered=lambda: events.append(("recovered", time.monotonic())),
    )
    with cam:
        assert _wait(lambda: len(frames) >= 5)
        hidden = tmp_path / "away"
        t_gone = time.monotonic()
        folder.rename(hidden)
        assert _wait(lambda: cam.lost, 5.0)
        assert events[0][0] == "lost" and events[0][1] - t_gone < 5.0
        assert "cam" in events[0][2]  # the reason names the folder
        n_before = len(frames)
        time.sleep(0.3)
        assert len(frames) == n_before and len(events) == 1  # one callback per episode
        hidden.rename(folder)
        assert _wait(lambda: not cam.lost, 5.0)
        assert _wait(lambda: len(frames) > n_before + 2)
    assert [e[0] for e in events] == ["lost", "recovered"]
    ids = [f.frame_id for f in frames]
    assert ids == list(range(len(ids)))  # ids keep counting across the reconnect
    assert cam.reconnects >= 1 and cam.lost_episodes == 1


def test_emptied_folder_is_lost(tmp_path):
    folder = _folder(tmp_path / "cam")
    lost = threading.Event()
    cam = open_camera(_Cfg(folder), on_lost=lambda r: lost.set())
    with cam:
        assert _wait(lambda: cam.frames_read > 2)
        shutil.rmtree(folder)
        folder.mkdir()
        assert lost.wait(5.0)


def test_camera_absent_at_start_is_lost_then_comes_up(tmp_path):
    folder = tmp_path / "later"
    frames, lost = [], []
    cam = open_camera(_Cfg(folder), on_frame=frames.append, on_lost=lost.append)
    with cam:
        assert _wait(lambda: cam.lost)
        assert "open failed" in lost[0]
        _folder(folder)
        assert _wait(lambda: not cam.lost and len(frames) > 0)
    assert frames[0].frame_id == 0


class _Stuck(FrameSource):
    """Opens fine, then blocks in read like a driver waiting on a dead link."""

    def __init__(self) -> None:
        super().__init__("stuck")
        self.release = threading.Event()
        self.reads = 0

    def open(self) -> None:
        pass

    def read(self):
        self.reads += 1
        if self.reads == 1:
            return np.zeros((4, 4, 3), np.uint8)
        self.release.wait(10)
        return np.zeros((4, 4, 3), np.uint8)


def test_watchdog_flags_a_read_that_blocks():
    src = _Stuck()
    lost, recovered = [], []
    cam = Camera(
        src, lost_after_s=0.3, on_lost=lost.append, on_recovered=lambda: recovered.append(1)
    )
    with cam:
        assert _wait(lambda: cam.lost, 3.0)
        assert "no frame for 0.3 s" in lost[0]
        src.release.set()
        assert _wait(lambda: not cam.lost, 3.0)
    assert recovered == [1]


class _Flaky(FrameSource):
    """Fails to open `fails` times, recording when each attempt happened."""

    def __init__(self, fails: int) -> None:
        super().__init__("flaky")
        self.fails = fails
        self.attempts: list[float] = []

    def open(self) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.fails:
            raise CameraError("flaky: not yet")

    def read(self):
        return np.zeros((4, 4, 3), np.uint8)


def test_backoff_doubles_up_to_the_cap():
    src = _Flaky(fails=5)
    cam = Camera(src, reconnect_initial_s=0.04, reconnect_max_s=0.16, lost_after_s=5)
    with cam:
        assert _wait(lambda: cam.get(0.05) is not None, 5.0)
    gaps = np.diff(src.attempts)
    assert len(gaps) == 5
    # 0.04, 0.08, 0.16, 0.16, 0.16: lower bounds only (waits may overrun, never undershoot).
    for gap, expected in zip(gaps, [0.04, 0.08, 0.16, 0.16, 0.16], strict=True):
        assert gap >= expected * 0.9
    assert gaps[2] > gaps[0]


def test_get_returns_newest_frame_only(tmp_path):
    folder = _folder(tmp_path / "cam", 3)
    cam = open_camera(_Cfg(folder))
    with cam:
        f1 = cam.get(2.0)
        time.sleep(0.2)
        f2 = cam.get(2.0)
    assert f1 is not None and f2 is not None
    assert f2.frame_id > f1.frame_id + 1  # frames in between were superseded, not queued


def test_callback_errors_do_not_kill_the_reader(tmp_path):
    folder = _folder(tmp_path / "cam", 2)
    seen = []

    def bad(frame):
        seen.append(frame.frame_id)
        raise RuntimeError("consumer bug")

    with open_camera(_Cfg(folder), on_frame=bad):
        assert _wait(lambda: len(seen) >= 5)
