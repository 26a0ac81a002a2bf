"""The training checkpoint (format ``lineguard-onenip/1``, docs/architecture.md) and its I/O.

A checkpoint is everything compress needs to build an edge artifact without the data or the
internet: the full state dict (frozen backbone included), the architecture, the recipe, the
classes, one golden prompt image per class, the score calibration measured on NORMAL validation
images, a fingerprint of the training data, metrics, and optimizer/scheduler state for resume.
Writes are atomic (temp file + ``os.replace``) so a crash never leaves a half-written file.

``data_fingerprint`` is :func:`lineguard.train.pack.data_fingerprint` over the NORMAL training
and validation samples: sha256 over sorted (relative path, class, label, sha256 of the file).
Content hashes rather than file sizes, so the same data read from folders or from a pack gives
the same fingerprint, and a re-encoded image does not pass as the same data.

``trained_file_keys`` (optional): short keys of the files of the images the model TRAINED on
(not the validation split), so calibration can say when it is fed training images
(`lineguard.runtime.calibration.seen`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.runtime.calibration.seen import keys_of
from lineguard.runtime.errors import LineGuardError
from lineguard.train.torch_model import OneNIP, OneNIPConfig

FORMAT = "lineguard-onenip/1"

REQUIRED_KEYS = (
    "format",
    "model_config",
    "state_dict",
    "train_config",
    "classes",
    "prompts",
    "calibration",
    "data_fingerprint",
    "metrics",
    "epoch",
)


def unwrap(model: torch.nn.Module) -> OneNIP:
    """The bare OneNIP inside DDP / train-step wrappers."""
    while not isinstance(model, OneNIP):
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if inner is None:
            raise TypeError(f"no OneNIP inside {type(model).__name__}")
        model = inner
    return model


def checkpoint_payload(
    model: torch.nn.Module,
    train_config: Any,
    data: Any,
    calibration: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    epoch: int = 0,
) -> dict[str, Any]:
    """The :data:`REQUIRED_KEYS` of a checkpoint of `model` trained with `train_config` (a
    `TrainConfig`) on `data` (`TrainingData`: classes, golden prompts, fingerprint)."""
    prompts = {
        c: {"path": str(data.train[i].path), "image": data.train_images[i].copy()}
        for c, i in zip(data.classes, data.prompt_index, strict=True)
    }
    return {
        "format": FORMAT,
        "model_config": train_config.model.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "train_config": train_config.model_dump(mode="json"),
        "classes": list(data.classes),
        "prompts": prompts,
        "calibration": calibration,
        "data_fingerprint": data.fingerprint,
        "trained_file_keys": keys_of(data.train_sha256),
        "metrics": metrics or {},
        "epoch": epoch,
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (must carry every :data:`REQUIRED_KEYS`) to ``path``."""
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on CPU, checking the format tag (LineGuardError if unusable)."""
    path = Path(path)
    if not path.is_file():
        raise LineGuardError(f"checkpoint {path} not found")
    try:
        # Our own file: numpy prompt images and pydantic dumps need full unpickling.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LineGuardError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise LineGuardError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise LineGuardError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[OneNIP, dict]:
    """Rebuild the OneNIP model of a checkpoint in eval mode; returns ``(model, checkpoint)``.

    The backbone weights come from the checkpoint, so nothing is read from the weight packages.
    """
    ckpt = read_checkpoint(path)
    cfg = OneNIPConfig.model_validate(ckpt["model_config"])
    model = OneNIP(cfg, pretrained=False)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval(), ckpt


def prompt_images(ckpt: dict) -> dict[str, np.ndarray]:
    """Default golden sample (uint8 H×W×3 RGB) per class."""
    return {cls: np.asarray(p["image"], dtype=np.uint8) for cls, p in ckpt["prompts"].items()}
