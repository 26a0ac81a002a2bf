"""Site and station configuration models (docs/architecture.md "Station config").

One pydantic model per feature, every field titled, unknown keys rejected (`extra="forbid"`), so a
typo in a YAML file fails loudly instead of silently using a default. Relative paths resolve
against the directory of the file they appear in: the loader (`config_loader.py`) passes that
directory as the validation context `base_dir`; without a context they are kept as written.

Coordinates (ROI, ignore masks) are fractions 0..1 of the frame width/height, so a station config
survives a camera resolution change. Thresholds are in normalised score units (1.0 ≈ the 99th
percentile of normal validation images, see `artifact.ScoreNormalization`).

Secrets: the broker password is never stored in a config file or model field; `password_file` or
`password_env` name where to read it, and `BrokerConfig.password()` returns a `SecretStr` so it is
never printed by accident.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.local_checks import golden_tile_count, image_problem, writable_file_problem
from lineguard.runtime.threshold_limits import ImageThreshold, MinAreaPx, PixelThreshold
from lineguard.runtime.tiling import TilingConfig

# Names that become MQTT topic levels: no '/', '+', '#', spaces or empty strings.
TOPIC_LEVEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's directory (context `base_dir`)."""
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))
    return value


def _check_files(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_files"))


def _check_local(info: ValidationInfo) -> bool:
    """Checks of this machine's state (environment, writable paths): validate-config and run."""
    return bool((info.context or {}).get("check_local"))


ConfigPath = Annotated[Path, AfterValidator(_resolve)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CameraConfig(_Strict):
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


class PromptConfig(_Strict):
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
        if _check_files(info):
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
        if v and image is not None and _check_files(info) and Path(image).is_file():
            actual = hashlib.sha256(Path(image).read_bytes()).hexdigest()
            if actual != v:
                raise ValueError(f"{image} has sha256 {actual}, config says {v}")
        return v


class ThresholdConfig(_Strict):
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


class DebounceConfig(_Strict):
    """Turns per-frame decisions into events: N defective frames in a row, then a quiet time."""

    consecutive: int = Field(1, ge=1, title="Defective frames in a row needed for an event")
    cooldown_s: float = Field(0.0, ge=0, title="Seconds after an event before the next one")


class EvidenceConfig(_Strict):
    """The JPEG overlay (frame + map + regions) an event refers to."""

    mqtt: bool = Field(True, title="Publish the JPEG on <prefix>/<line>/<station>/evidence/<id>")
    max_bytes: int = Field(
        100_000, ge=1000, title="Largest JPEG; quality/size is reduced until it fits"
    )
    save_dir: ConfigPath | None = Field(None, title="Also save JPEGs here (None = do not save)")
    retention_days: float = Field(7.0, gt=0, title="Delete saved JPEGs older than this")


class QueueConfig(_Strict):
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


class StationConfig(_Strict):
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
        if _check_files(info) and not (v / "model.json").is_file():
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
        if not _check_files(info) or t is None or not t.position_norm or t.prompt != "per-tile":
            return self
        n = golden_tile_count(self.model, self.prompt.image, self.roi, t)
        if n is not None and n != len(t.position_norm):
            raise ValueError(
                f"tiling.position_norm holds {len(t.position_norm)} positions but the golden "
                f"sample's grid has {n} tiles; re-run `lineguard calibrate --positions`"
            )
        return self


class TLSConfig(_Strict):
    """TLS to the broker: a CA to trust and, for mutual TLS, a client certificate and key."""

    ca: ConfigPath | None = Field(None, title="CA certificate file (None = system CAs)")
    cert: ConfigPath | None = Field(None, title="Client certificate (mutual TLS)")
    key: ConfigPath | None = Field(None, title="Client private key (mutual TLS)")
    insecure: bool = Field(
        False, title="Skip hostname verification (testing only; the chain is still checked)"
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self

    @field_validator("ca", "cert", "key")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and _check_files(info) and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v


class BrokerConfig(_Strict):
    """MQTT broker connection. The password comes from a file or an environment variable."""

    host: str = Field(title="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, title="Broker port (8883 is usual for TLS)")
    tls: TLSConfig | None = Field(None, title="TLS settings (None = plain TCP)")
    username: str | None = Field(None, title="User name")
    password_file: ConfigPath | None = Field(None, title="File holding the password")
    password_env: str | None = Field(None, title="Environment variable holding the password")
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        title="MQTT protocol version",
        description="5 lets the runtime refuse a threshold command published with retain=true "
        "even when it arrives live; 3.1.1 only for brokers without MQTT 5 (there such a command "
        "is refused only when replayed from the broker's store)",
    )
    keepalive: int = Field(30, ge=5, le=3600, title="MQTT keepalive, seconds")
    client_id: str | None = Field(
        None, title="MQTT client id, unique per edge PC (None = 'lineguard-<edge_id>')"
    )
    reconnect_min_s: int = Field(1, ge=1, title="First reconnect delay, seconds (doubles)")
    reconnect_max_s: int = Field(30, ge=1, title="Largest reconnect delay, seconds")

    @model_validator(mode="after")
    def _credentials(self) -> BrokerConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and not self.username:
            raise ValueError("a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: object) -> object:
        return "5" if v == 5 and not isinstance(v, bool) else v

    @field_validator("password_env")
    @classmethod
    def _password_env_set(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and _check_local(info) and v not in os.environ:
            raise ValueError(f"environment variable {v} is not set (run would fail)")
        return v

    @field_validator("password_file")
    @classmethod
    def _password_file_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and _check_files(info) and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v

    def password(self) -> SecretStr | None:
        """Read the password now (so a rotated secret file is picked up on restart)."""
        if self.password_file is not None:
            try:
                text = Path(self.password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise LineGuardError(
                    f"broker password_file {self.password_file}: {exc.strerror}"
                ) from None
            return SecretStr(text.rstrip("\r\n"))
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LineGuardError(
                    f"broker password_env: environment variable {self.password_env} is not set"
                )
            return SecretStr(value)
        return None


class OutboxConfig(_Strict):
    """Durable store-and-forward for events (SQLite); bounded, never silently."""

    path: ConfigPath = Field(Path("state/outbox.sqlite"), title="SQLite file")
    max_events: int = Field(100_000, ge=10, title="Most events kept; the oldest go first, logged")
    max_age_h: float = Field(168.0, gt=0, title="Events older than this are dropped, logged")
    group_commit_ms: float = Field(
        50.0,
        ge=0,
        le=1000,
        title="Group commit window, ms: events handed over within it share one commit (one fsync)",
        description="The writer thread commits every event handed over within this time of the "
        "first in one transaction, so an idle writer commits an event this long after it was "
        "decided; when it is behind, the time counts from its previous commit, "
        "so a group never grows with the backlog; 0 commits without waiting for more",
    )


class InferenceConfig(_Strict):
    """How `lineguard run` shares each model between stations (docs/performance.md,
    "Inference threads"); unset values follow the rule from cores and stations."""

    cores: int | None = Field(
        None, ge=1, le=1024, title="Cores for inference (None = the CPUs this process may use)"
    )
    streams: int | None = Field(
        None, ge=1, le=64, title="Parallel inferences per model (None = the rule)"
    )
    threads_per_stream: int | None = Field(
        None, ge=1, le=256, title="Threads per inference (None = the rule)"
    )


class MetricsConfig(_Strict):
    """Prometheus endpoint (`/metrics`); `lineguard run --metrics-port` overrides the port."""

    port: int = Field(9464, ge=1, le=65535, title="TCP port serving /metrics")
    host: str = Field(
        "0.0.0.0",
        title="Address to listen on (0.0.0.0 = all; 127.0.0.1 = this PC only)",
    )


class SiteConfig(_Strict):
    """One edge PC: its stations, its broker and where it keeps its state."""

    edge_id: str = Field(pattern=TOPIC_LEVEL, title="Edge PC id (an MQTT topic level)")
    topic_prefix: str = Field(
        "lineguard",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*[A-Za-z0-9_.-]$|^[A-Za-z0-9]$",
        title="First topic level(s) of every topic",
    )
    broker: BrokerConfig | None = Field(
        None, title="MQTT broker (None = no broker: events go to the outbox and stdout)"
    )
    stations: list[str] = Field(
        min_length=1, title="Station config files or glob patterns, relative to this file"
    )
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, title="Event outbox")
    stats_interval_s: float = Field(10.0, gt=0, title="Seconds between stats messages")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, title="Model sharing: cores, streams, threads"
    )
    metrics: MetricsConfig | None = Field(
        None, title="Prometheus /metrics endpoint (None = off unless --metrics-port is given)"
    )
    audit_log: ConfigPath = Field(
        Path("state/audit.jsonl"), title="Audit log of threshold changes (JSON lines)"
    )

    @model_validator(mode="after")
    def _defaults_resolved(self, info: ValidationInfo) -> SiteConfig:
        # Defaults are not validated, so resolve the default paths against base_dir here.
        base = (info.context or {}).get("base_dir")
        if base is not None:
            if "path" not in self.outbox.model_fields_set:
                self.outbox.path = Path(base) / self.outbox.path
            if "audit_log" not in self.model_fields_set:
                self.audit_log = Path(base) / self.audit_log
        if _check_local(info):  # what `run` will create or write, checked without touching disk
            for key, path in (("outbox.path", self.outbox.path), ("audit_log", self.audit_log)):
                problem = writable_file_problem(path)
                if problem:
                    raise ValueError(f"{key}: {problem}")
        return self

    def client_id(self) -> str:
        if self.broker is not None and self.broker.client_id:
            return self.broker.client_id
        return f"lineguard-{self.edge_id}"
