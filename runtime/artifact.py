"""The model artifact contract (architecture.md): the `model.json` schema, shared by compress and
runtime.

compress writes it last (an artifact without it is incomplete by definition); runtime reads and
checks it before loading any graph. Kept free of torch and of any inference library.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.threshold_limits import ImageThreshold, PixelThreshold

FORMAT_VERSION = 1
MODEL_JSON = "model.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str = Field(title="Tensor name in the graph")
    shape: list[int | str] = Field(title="Shape; a string marks a dynamic axis")
    dtype: str = Field(title="Element type, e.g. uint8, float32")


class GraphSpec(_Strict):
    inputs: list[TensorSpec] = Field(title="Graph inputs in order")
    outputs: list[TensorSpec] = Field(title="Graph outputs in order")
    files: dict[str, str] = Field(
        title="Files per format",
        description=(
            "format -> file name, e.g. {'onnx': 'detector.onnx', 'openvino': 'detector.xml'}"
        ),
    )


class Normalization(_Strict):
    """normalized = (raw - center) / scale, measured on NORMAL validation images only."""

    center: float = Field(
        allow_inf_nan=False, title="Raw value mapped to 0 (median of normal validation scores)"
    )
    scale: float = Field(
        gt=0,
        allow_inf_nan=False,
        title="Raw spread mapped to 1 (p99 minus median on normal validation)",
    )


class ScoreNormalization(_Strict):
    image: Normalization = Field(title="Image score normalisation")
    pixel: Normalization = Field(title="Pixel map normalisation")
    source: str = Field(title="What the statistics were measured on (never test images)")
    count: int = Field(ge=1, title="Number of normal validation images used")


class Thresholds(_Strict):
    image: ImageThreshold = Field(title="Default image threshold, in normalised units")
    pixel: PixelThreshold = Field(title="Default pixel threshold, in normalised units")


class Precision(_Strict):
    """One compiled variant (fp32 or int8) and what it measured against the reference."""

    files: dict[str, str] = Field(title="graph name -> file for this precision")
    parity: dict[str, float] = Field(default_factory=dict, title="Parity figures vs PyTorch/FP32")
    accuracy: dict[str, float] = Field(default_factory=dict, title="Accuracy figures (fractions)")
    evaluated_on: str = Field("", title="Images the parity/accuracy figures were measured on")
    budgets: dict[str, float] = Field(
        default_factory=dict, title="Gate budgets the figures were checked against"
    )
    calibrated_on: str = Field("", title="Images an INT8 model was calibrated on (never test)")
    method: str = Field("", title="How this precision was produced (tool, settings, scheme)")
    float_ops: Literal["f32", "bf16"] = Field(
        "f32",
        title="Precision OpenVINO runs the ops an INT8 model leaves in float",
        description="The INT8 gate measured the model this way; engines run it this way (bf16 "
        "falls back to f32 on CPUs without native bf16).",
    )
    score_normalization: ScoreNormalization | None = Field(
        None,
        title="Normalisation re-measured with this precision (same normal validation images)",
        description="When set, engines of this precision use it instead of the card's.",
    )


class ModelCard(_Strict):
    """Contents of `model.json`."""

    format_version: int = Field(FORMAT_VERSION, title="model.json format version")
    name: str = Field(title="Human-readable model name")
    created: str = Field(title="ISO-8601 creation time (UTC)")
    input_size: list[int] = Field(title="[height, width] the graphs take")
    color_order: Literal["RGB", "BGR"] = Field("RGB", title="Channel order of the uint8 input")
    resize: str = Field("bilinear-antialias", title="How a frame is resized to input_size")
    layout: Literal["NHWC"] = Field("NHWC", title="Input layout of the uint8 image tensor")
    backbone: str = Field(title="timm backbone name")
    recipe: dict = Field(default_factory=dict, title="Training recipe (full training config)")
    classes: list[str] = Field(title="Classes (products) the model was trained on")
    prompt_encoder: GraphSpec = Field(title="image -> prompt tokens")
    detector: GraphSpec = Field(title="image + prompt tokens -> anomaly map + image score")
    score_normalization: ScoreNormalization = Field(title="Score normalisation (normal images)")
    thresholds: Thresholds = Field(title="Default thresholds (normalised units)")
    precisions: dict[str, Precision] = Field(
        default_factory=dict, title="Available precisions: 'fp32', 'int8'"
    )
    checkpoint_sha256: str = Field("", title="sha256 of the training checkpoint")
    checkpoint: str = Field("", title="Path of the training checkpoint when exported")
    data_fingerprint: str = Field(
        "", title="Fingerprint of the training data (from the checkpoint)"
    )
    trained_file_keys: list[str] = Field(
        default_factory=list,
        title="First 16 hex digits of the sha256 of each image file the model trained on",
        description="Lets `lineguard calibrate --folder` say when it is given training images, "
        "whose scores run low (validation images are not listed: never trained on)",
    )
    prompts: dict[str, str] = Field(
        default_factory=dict, title="class -> golden prompt image file in the artifact"
    )
    versions: dict[str, str] = Field(
        default_factory=dict, title="Tool versions and ONNX opset used to build the artifact"
    )
    sha256: dict[str, str] = Field(title="sha256 of every other file in the artifact")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(artifact_dir: str | Path, verify: bool = True) -> ModelCard:
    """Read and validate `model.json`; with `verify`, check every listed file's sha256."""
    root = Path(artifact_dir)
    path = root / MODEL_JSON
    if not path.is_file():
        raise LineGuardError(f"{root}: not a model artifact (no {MODEL_JSON}; incomplete export?)")
    try:
        card = ModelCard.model_validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise LineGuardError(f"{path}: invalid model card: {exc}") from exc
    if card.format_version != FORMAT_VERSION:
        raise LineGuardError(
            f"{path}: format_version {card.format_version}, this runtime reads {FORMAT_VERSION}"
        )
    if verify:
        for name, digest in card.sha256.items():
            f = root / name
            if not f.is_file():
                raise LineGuardError(f"{root}: file {name} listed in model.json is missing")
            if sha256_file(f) != digest:
                raise LineGuardError(f"{root}: {name} does not match its sha256 in model.json")
    return card


def write_card(artifact_dir: str | Path, card: ModelCard) -> Path:
    """Write `model.json` atomically (temp file + rename): it is the artifact's commit marker."""
    root = Path(artifact_dir)
    tmp = root / (MODEL_JSON + ".tmp")
    tmp.write_text(card.model_dump_json(indent=2))
    tmp.replace(root / MODEL_JSON)
    return root / MODEL_JSON
