"""Station configuration models (docs/architecture.md "Station config"); the site's are in
`site_config.py`, what both share in `config_base.py`.

One pydantic model per feature, every field titled, unknown keys rejected (`extra="forbid"`), so a
typo in a YAML file fails loudly instead of silently using a default; relative paths resolve
against the file's directory (`config_base.py`).

Coordinates (ROI, ignore masks) are fractions 0..1 of the frame width/height, so a station config
survives a camera resolution change. Thresholds are in normalised score units (1.0 ≈ the 99th
percentile of normal validation images, see `artifact.ScoreNormalization`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lineguard.runtime.config_base import (
    TOPIC_LEVEL,
    ConfigPath,
    StrictModel,
    check_files,
)
from lineguard.runtime.local_checks import golden_tile_count, image_problem
from lineguard.runtime.threshold_limits import ImageThreshold, MinAreaPx, PixelThreshold
from lineguard.runtime.tiling import TilingConfig


class CameraConfig(StrictModel):
    """Where frames come from; `lineguard.camera.open_source` turns this into a FrameSource."""

    kind: Literal["device", "stream", "video", "folder", "genicam"] = Field(
        title="Source kind",
        description="device: OpenCV index; stream: RTSP/HTTP URL; video: file; folder: images "
        "replayed at `fps`; genicam: GenTL producer (.cti) in `path`, camera number in `index`",
    )
    index: int | None = Field(None, ge=0, title="Device index (device, genicam)")
    url: str | None = Field(None, title="Stream URL (stream), e.g. rtsp://host/path")
    path: ConfigPath | None = Field(None, title="Video file, image folder or .cti file")
    fps: float | None = Field(
        None, gt=0, title="Frames per second to pace a folder/video at (None = as fast as possible)"
    )
    loop: bool = Field(False, title="Restart a folder/video at its end")
    width: int | None = Field(None, gt=0, title="Requested capture width (device/genicam)")
    height: int | None = Field(None, gt=0, title="Requested capture height (device/genicam)")
    reconnect_initial_s: float = Field(0.5, gt=0, title="First reconnect delay, seconds")
    reconnect_max_s: float = Field(10.0, gt=0, title="Largest reconnect delay (backoff cap)")
    lost_after_s: float = Field(
        3.0, gt=0, title="No frame for this long marks the camera lost (status camera-lost)"
    )

    @model_validator(mode="after")
    def _needs_source(self) -> CameraConfig:
        need = {"device": "index", "stream": "url", "video": "path", "folder": "path"}
        if self.kind == "genicam" and self.path is None:
            raise ValueError("kind 'genicam' needs 'path' (the GenTL producer .cti file)")
        key = need.get(self.kind)
        if key and getattr(self, key) is None:
            raise ValueError(f"kind '{self.kind}' needs '{key}'")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class PromptConfig(StrictModel):
    """The station's golden sample: one normal image whose tokens are computed once at start."""

    image: ConfigPath = Field(title="Prompt image (a normal part, as this camera sees it)")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        title="sha256 of the image file; when given, a different file is refused",
    )

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha_is_text(cls, v: object) -> object:
        if isinstance(v, int | float):
            raise ValueError("sha256 was read as a number: quote it in YAML")
        return v

    @field_validator("image")
    @classmethod
    def _image_exists(cls, v: Path, info: ValidationInfo) -> Path:
        if check_files(info):
            if not v.is_file():
                raise ValueError(f"prompt image not found: {v}")
            problem = image_problem(v)
            if problem:
                raise ValueError(f"prompt image {problem}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha_matches(cls, v: str | None, info: ValidationInfo) -> str | None:
        image = info.data.get("image")
        if v and image is not None and check_files(info) and Path(image).is_file():
            actual = hashlib.sha256(Path(image).read_bytes()).hexdigest()
            if actual != v:
                raise ValueError(f"{image} has sha256 {actual}, config says {v}")
        return v


class ThresholdConfig(StrictModel):
    """Decision thresholds in normalised units; None takes the artifact's default."""

    image: ImageThreshold | None = Field(
        None,
        title="Image score above which a frame is defective",
        description="A finite number, > 0 and <= 1000 (see runtime/threshold_limits.py)",
    )
    pixel: PixelThreshold | None = Field(
        None,
        title="Pixel score above which a pixel belongs to a defect",
        description="A finite number, > 0 and <= 1000",
    )
    min_area_px: MinAreaPx = Field(
        16,
        title="Smallest defect region kept, in pixels of the anomaly map",
        description="An integer, 1 to 1000000",
    )


class DebounceConfig(StrictModel):
    """Turns per-frame decisions into events: N defective frames in a row, then a quiet time."""

    consecutive: int = Field(1, ge=1, title="Defective frames in a row needed for an event")
    cooldown_s: float = Field(0.0, ge=0, title="Seconds after an event before the next one")


class EvidenceConfig(StrictModel):
    """The JPEG overlay (frame + map + regions) an event refers to."""

    mqtt: bool = Field(True, title="Publish the JPEG on <prefix>/<line>/<station>/evidence/<id>")
    max_bytes: int = Field(
        100_000, ge=1000, title="Largest JPEG; quality/size is reduced until it fits"
    )
    save_dir: ConfigPath | None = Field(None, title="Also save JPEGs here (None = do not save)")
    retention_days: float = Field(7.0, gt=0, title="Delete saved JPEGs older than this")


class QueueConfig(StrictModel):
    """Bounded frame queue between camera and inference; drops are counted on the stats topic."""

    size: int = Field(2, ge=1, title="Frames held between capture and inference")
    drop: Literal["oldest", "newest"] = Field(
        "oldest", title="Which frame to drop when full (oldest keeps latency low)"
    )


def _fraction(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError("coordinates are fractions of the frame, between 0 and 1")
    return v


Fraction = Annotated[float, AfterValidator(_fraction)]


def _polygon(v: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(v) < 3:
        raise ValueError(f"a polygon needs at least 3 points, has {len(v)}")
    return v


Polygon = Annotated[list[tuple[Fraction, Fraction]], AfterValidator(_polygon)]


class StationConfig(StrictModel):
    """One inspection station: one camera, one prompt, one set of thresholds."""

    station_id: str = Field(pattern=TOPIC_LEVEL, title="Station id (an MQTT topic level)")
    line_id: str = Field(pattern=TOPIC_LEVEL, title="Production line id (an MQTT topic level)")
    model: ConfigPath = Field(title="Model artifact folder (with model.json)")
    engine: Literal["openvino", "onnxruntime"] = Field("openvino", title="Inference engine")
    precision: Literal["int8", "fp32", "bf16"] = Field("int8", title="Model precision")
    threads: int = Field(
        1,
        ge=1,
        le=256,
        title="Inference threads when this station's model is loaded on its own",
        description="Used by `lineguard calibrate` and the deploy health check; `lineguard run` "
        "shares one compiled model per artifact and precision between stations and plans its "
        "threads from the site's `inference` settings",
    )
    camera: CameraConfig = Field(title="Frame source")
    prompt: PromptConfig = Field(title="Golden sample (visual prompt)")
    roi: tuple[Fraction, Fraction, Fraction, Fraction] | None = Field(
        None, title="Region of interest [x, y, w, h] as fractions of the frame (None = all)"
    )
    ignore_masks: list[Polygon] = Field(
        default_factory=list,
        title="Polygons (lists of [x, y] fractions of the frame) whose pixels never alert",
    )
    thresholds: ThresholdConfig = Field(default_factory=ThresholdConfig, title="Thresholds")
    debounce: DebounceConfig = Field(default_factory=DebounceConfig, title="Debounce")
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig, title="Evidence JPEG")
    queue: QueueConfig = Field(default_factory=QueueConfig, title="Frame queue")
    tiling: TilingConfig | None = Field(
        None, title="Tiled inference at a fixed scale (None = the ROI resized to the model input)"
    )

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path, info: ValidationInfo) -> Path:
        if check_files(info) and not (v / "model.json").is_file():
            raise ValueError(f"no model artifact (model.json) in {v}")
        return v

    @field_validator("roi")
    @classmethod
    def _roi_inside(cls, v: tuple[float, float, float, float] | None) -> tuple | None:
        if v is not None:
            x, y, w, h = v
            if w <= 0 or h <= 0 or x + w > 1.0 + 1e-9 or y + h > 1.0 + 1e-9:
                raise ValueError("roi [x, y, w, h] must have w, h > 0 and stay inside the frame")
        return v

    @model_validator(mode="after")
    def _rulers_fit_the_grid(self, info: ValidationInfo) -> StationConfig:
        """Per-position rulers must match the golden sample's tile grid (`run` refuses to start
        otherwise), so `validate-config` says so first."""
        t = self.tiling
        if not check_files(info) or t is None or not t.position_norm or t.prompt != "per-tile":
            return self
        n = golden_tile_count(self.model, self.prompt.image, self.roi, t)
        if n is not None and n != len(t.position_norm):
            raise ValueError(
                f"tiling.position_norm holds {len(t.position_norm)} positions but the golden "
                f"sample's grid has {n} tiles; re-run `lineguard calibrate --positions`"
            )
        return self
