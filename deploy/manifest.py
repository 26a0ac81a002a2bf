"""`manifest.json`: what a bundle holds and the sha256 + size of every file in it.

The manifest is the single thing that is signed, so it must list every file: verify refuses an
archive holding anything it does not list, and any file it lists that is missing.
"""

from __future__ import annotations

import json
import platform
import re
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lineguard.runtime.artifact import MODEL_JSON, ModelCard, sha256_file
from lineguard.runtime.errors import LineGuardError

BUNDLE_FORMAT = "lineguard-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL_DIR = "model"
STATIONS_DIR = "stations"
PROMPTS_DIR = "prompts"
SITE_FILE = "site.yaml"
# Not in bundles: each release gets a `state` link to <root>/state, where the runtime writes.
STATE_DIR = "state"
TOP_LEVEL = (MODEL_DIR, STATIONS_DIR, PROMPTS_DIR, SITE_FILE)
# The version becomes a directory name under releases/: keep it to a safe, portable alphabet.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str = Field(title="sha256 of the file's bytes (hex)")
    size: int = Field(ge=0, title="Size in bytes")


class RuntimeVersions(_Strict):
    lineguard: str = Field(title="lineguard package version that built the bundle")
    python: str = Field(title="Python version that built the bundle")
    openvino: str | None = Field(None, title="OpenVINO version at build time (None: absent)")
    onnxruntime: str | None = Field(None, title="ONNX Runtime version at build time (None: absent)")


class ModelSummary(_Strict):
    """The parts of model.json an operator checks before installing."""

    name: str = Field(title="Model name")
    created: str = Field(title="When the artifact was written")
    input_size: list[int] = Field(title="[height, width] of the graphs")
    backbone: str = Field(title="Backbone")
    classes: list[str] = Field(title="Classes it was trained on")
    precisions: list[str] = Field(title="Available precisions")
    thresholds: dict[str, float] = Field(title="Default thresholds (normalised units)")
    model_json_sha256: str = Field(title="sha256 of model.json")


class StationEntry(_Strict):
    id: str = Field(title="Station id (the config file name without .yaml when not stated)")
    config: str = Field(title="Path of the station config inside the bundle")
    prompts: list[str] = Field(default_factory=list, title="Prompt images inside the bundle")


class Manifest(_Strict):
    format: Literal["lineguard-bundle/1"] = Field(BUNDLE_FORMAT, title="Bundle format")
    version: str = Field(title="Bundle version (becomes releases/<version>/)")
    created: str = Field(title="ISO-8601 build time (UTC)")
    runtime: RuntimeVersions = Field(title="Versions of the build environment")
    model: ModelSummary = Field(title="Summary of model.json")
    stations: list[StationEntry] = Field(title="Station configs in the bundle")
    site: str | None = Field(None, title="Path of the site config inside the bundle, if any")
    files: dict[str, FileEntry] = Field(title="Every file of the bundle except the manifest")

    @field_validator("version")
    @classmethod
    def _safe_version(cls, v: str) -> str:
        check_version(v)
        return v

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


def check_version(v: str) -> str:
    if not VERSION_RE.match(v) or v in {".", ".."}:
        raise LineGuardError(
            f"bundle version {v!r}: use 1-64 characters of letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit"
        )
    return v


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate(json.loads(data))
    except (ValueError, json.JSONDecodeError) as exc:
        raise LineGuardError(f"{where}: invalid manifest.json: {exc}") from exc


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def runtime_versions() -> RuntimeVersions:
    """Versions from package metadata: importing openvino just to read its version is slow."""
    return RuntimeVersions(
        lineguard=_dist_version("lineguard") or "unknown",
        python=platform.python_version(),
        openvino=_dist_version("openvino"),
        onnxruntime=_dist_version("onnxruntime"),
    )


def model_summary(card: ModelCard, artifact_dir: Path) -> ModelSummary:
    return ModelSummary(
        name=card.name,
        created=card.created,
        input_size=card.input_size,
        backbone=card.backbone,
        classes=card.classes,
        precisions=sorted(card.precisions),
        thresholds={"image": card.thresholds.image, "pixel": card.thresholds.pixel},
        model_json_sha256=sha256_file(artifact_dir / MODEL_JSON),
    )


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
