"""Build sources and cameras from a `CameraConfig` (runtime/config.py) or a look-alike object.

Only attribute access is used, so this package does not depend on the config models
(architecture.md: camera imports nothing of ours beyond the shared error type).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lineguard.camera.errors import CameraConfigError
from lineguard.camera.frame import Frame
from lineguard.camera.reader import Camera
from lineguard.camera.sources import FolderSource, FrameSource, OpenCVSource

KINDS = ("device", "stream", "video", "folder", "genicam")


def _need(cfg: Any, key: str) -> Any:
    value = getattr(cfg, key, None)
    if value is None:
        raise CameraConfigError(f"camera kind '{cfg.kind}' needs '{key}'")
    return value


def open_source(cfg: Any, name: str | None = None) -> FrameSource:
    """The FrameSource for `cfg.kind` (not opened yet; `Camera` opens it in its thread)."""
    kind = getattr(cfg, "kind", None)
    name = name or str(kind)
    loop = bool(getattr(cfg, "loop", False))
    width, height = getattr(cfg, "width", None), getattr(cfg, "height", None)
    fps = getattr(cfg, "fps", None)
    timeout = max(float(getattr(cfg, "lost_after_s", 3.0) or 3.0), 1.0)
    if kind == "device":
        return OpenCVSource(
            int(_need(cfg, "index")), name=name, width=width, height=height, fps=fps
        )
    if kind == "stream":
        return OpenCVSource(str(_need(cfg, "url")), name=name, timeout_s=timeout)
    if kind == "video":
        return OpenCVSource(str(_need(cfg, "path")), name=name, is_file=True, loop=loop)
    if kind == "folder":
        return FolderSource(_need(cfg, "path"), name=name, loop=loop)
    if kind == "genicam":
        from lineguard.camera.genicam import GenICamSource  # optional dependency

        return GenICamSource(
            _need(cfg, "path"),
            name=name,
            index=int(getattr(cfg, "index", None) or 0),
            timeout_s=timeout,
            width=width,
            height=height,
        )
    raise CameraConfigError(f"unknown camera kind {kind!r}; expected one of {', '.join(KINDS)}")


def open_camera(
    cfg: Any,
    *,
    name: str | None = None,
    on_frame: Callable[[Frame], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
    on_recovered: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> Camera:
    """A `Camera` for `cfg` with its reconnect/loss settings; call `.start()` to begin reading."""
    return Camera(
        open_source(cfg, name),
        fps=getattr(cfg, "fps", None),
        reconnect_initial_s=float(getattr(cfg, "reconnect_initial_s", 0.5)),
        reconnect_max_s=float(getattr(cfg, "reconnect_max_s", 10.0)),
        lost_after_s=float(getattr(cfg, "lost_after_s", 3.0)),
        on_frame=on_frame,
        on_lost=on_lost,
        on_recovered=on_recovered,
        on_end=on_end,
    )
