"""LineGuard camera stage: frame sources, a reconnecting reader with a `lost` state, `Frame`."""

from lineguard.camera.errors import CameraConfigError
from lineguard.camera.factory import KINDS, open_camera, open_source
from lineguard.camera.frame import Frame, decode_image, read_image, to_rgb_u8
from lineguard.camera.reader import Camera
from lineguard.camera.sources import CameraError, FolderSource, FrameSource, OpenCVSource

__all__ = [
    "KINDS",
    "Camera",
    "CameraConfigError",
    "CameraError",
    "FolderSource",
    "Frame",
    "FrameSource",
    "OpenCVSource",
    "decode_image",
    "open_camera",
    "open_source",
    "read_image",
    "to_rgb_u8",
]
