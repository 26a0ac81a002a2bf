"""GenICam (GigE Vision / USB3 Vision) cameras through `harvesters`, an optional extra.

`harvesters` and a vendor GenTL producer (.cti file) are only needed at stations that use such a
camera, so the import happens here, on first use, with an error that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import cv2
import numpy as np

from lineguard.camera.errors import CameraConfigError
from lineguard.camera.frame import to_rgb_u8
from lineguard.camera.sources import CameraError, FrameSource

# Bayer pattern (PFNC name prefix) -> OpenCV demosaicing code. OpenCV names Bayer patterns by the
# second row's first two pixels, hence the apparent swap.
_BAYER = {
    "BayerRG": cv2.COLOR_BayerBG2RGB,
    "BayerBG": cv2.COLOR_BayerRG2RGB,
    "BayerGR": cv2.COLOR_BayerGB2RGB,
    "BayerGB": cv2.COLOR_BayerGR2RGB,
}


def require_harvesters():
    """Import `harvesters.core`, or raise a CameraConfigError that says how to get it."""
    try:
        return importlib.import_module("harvesters.core")
    except ImportError as exc:
        raise CameraConfigError(
            "camera kind 'genicam' needs the optional 'harvesters' package: "
            "pip install 'lineguard[genicam]' (plus your camera vendor's GenTL producer .cti)"
            f" [{exc}]"
        ) from None


def component_to_rgb(data: np.ndarray, width: int, height: int, pixel_format: str) -> np.ndarray:
    """Turn one GenICam image component (1-D buffer + PFNC format name) into RGB uint8."""
    fmt = pixel_format or ""
    channels = max(1, data.size // max(1, width * height))
    image = data.reshape(height, width, channels) if channels > 1 else data.reshape(height, width)
    if fmt.startswith("Bayer"):
        code = _BAYER.get(fmt[:7])
        if code is None:
            raise CameraError(f"unsupported Bayer format {fmt}")
        if image.dtype != np.uint8:
            bits = int("".join(c for c in fmt[7:] if c.isdigit()) or 16)
            image = (image.astype(np.uint32) >> max(0, bits - 8)).astype(np.uint8)
        return cv2.cvtColor(image, code)
    if image.dtype == np.uint16 and fmt.startswith("Mono"):
        bits = int("".join(c for c in fmt[4:] if c.isdigit()) or 16)
        image = (image.astype(np.uint32) >> max(0, bits - 8)).astype(np.uint8)
    order = "BGR" if fmt.startswith("BGR") else "RGB"
    return to_rgb_u8(image, order)


class GenICamSource(FrameSource):
    """One camera of a GenTL producer; `index` picks it in the producer's device list."""

    def __init__(
        self,
        cti: str | Path,
        *,
        name: str,
        index: int = 0,
        timeout_s: float = 3.0,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        super().__init__(name)
        self._core = require_harvesters()
        self.cti = Path(cti)
        self.index = index
        self.timeout_s = timeout_s
        self.width, self.height = width, height
        self._h = None
        self._ia = None

    def open(self) -> None:
        self.close()
        if not self.cti.is_file():
            raise CameraError(f"{self.name}: GenTL producer not found: {self.cti}")
        try:
            h = self._core.Harvester()
            h.add_file(str(self.cti))
            h.update()
            if self.index >= len(h.device_info_list):
                h.reset()
                raise CameraError(
                    f"{self.name}: no GenICam device #{self.index} "
                    f"({len(h.device_info_list)} found through {self.cti})"
                )
            ia = h.create(self.index)
            nodes = ia.remote_device.node_map
            if self.width:
                nodes.Width.value = self.width
            if self.height:
                nodes.Height.value = self.height
            ia.start()
        except CameraError:
            raise
        except Exception as exc:  # harvesters/genicam raise many exception types
            raise CameraError(f"{self.name}: cannot open GenICam device: {exc}") from None
        self._h, self._ia = h, ia

    def read(self) -> np.ndarray | None:
        if self._ia is None:
            raise CameraError(f"{self.name}: not open")
        try:
            with self._ia.fetch(timeout=self.timeout_s) as buffer:
                comp = buffer.payload.components[0]
                # Copy out before the buffer is re-queued to the producer.
                return component_to_rgb(
                    np.array(comp.data, copy=True), comp.width, comp.height, comp.data_format
                )
        except CameraError:
            raise
        except Exception as exc:
            raise CameraError(f"{self.name}: GenICam fetch failed: {exc}") from None

    def close(self) -> None:
        for obj, method in ((self._ia, "stop"), (self._ia, "destroy"), (self._h, "reset")):
            if obj is not None:
                with contextlib.suppress(Exception):
                    getattr(obj, method)()
        self._ia = self._h = None

    def describe(self) -> str:
        return f"GenICam device {self.index} via {self.cti.name}"
