"""Writing `model.json` (the `ModelCard`) and the files it vouches for.

The card is written LAST, with the sha256 of every other file in the artifact: an artifact
without it is incomplete by definition, and one whose files changed after the gates ran fails
verification at the edge. `compress/schemas/model.schema.json` is generated from the same model.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.compress.checkpoint import Checkpoint
from lineguard.runtime.artifact import (
    MODEL_JSON,
    GraphSpec,
    ModelCard,
    Normalization,
    Precision,
    ScoreNormalization,
    TensorSpec,
    Thresholds,
    sha256_file,
    write_card,
)

SCHEMA_PATH = Path(__file__).parent / "schemas" / "model.schema.json"
PROMPTS_DIR = "prompts"


def model_schema() -> dict[str, Any]:
    """JSON Schema of `model.json`, generated from `ModelCard` (the single source of truth)."""
    schema = ModelCard.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://lineguard.dev/schemas/model.schema.json"
    return schema


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(model_schema(), indent=2) + "\n")
    return path


def graph_specs(
    size: int, n_tokens: int, dim: int, dynamic_batch: bool
) -> tuple[GraphSpec, GraphSpec]:
    """I/O of the two graphs as exported (names fixed by docs/architecture.md)."""
    b: int | str = "batch" if dynamic_batch else 1
    image = TensorSpec(name="image", shape=[b, size, size, 3], dtype="uint8")
    encoder = GraphSpec(
        inputs=[image],
        outputs=[TensorSpec(name="prompt_tokens", shape=[b, n_tokens, dim], dtype="float32")],
        files={"onnx": "prompt_encoder.onnx", "openvino": "prompt_encoder.xml"},
    )
    detector = GraphSpec(
        inputs=[image, TensorSpec(name="prompt_tokens", shape=[b, n_tokens, dim], dtype="float32")],
        outputs=[
            TensorSpec(name="anomaly_map", shape=[b, 1, size, size], dtype="float32"),
            TensorSpec(name="image_score", shape=[b], dtype="float32"),
        ],
        files={"onnx": "detector.onnx", "openvino": "detector.xml"},
    )
    return encoder, detector


def save_prompts(out: Path, prompts: dict[str, np.ndarray]) -> dict[str, str]:
    """Golden samples as lossless PNGs `prompts/<class>.png` (stations reference them)."""
    (out / PROMPTS_DIR).mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for cls, rgb in sorted(prompts.items()):
        rel = f"{PROMPTS_DIR}/{cls}.png"
        if not cv2.imwrite(str(out / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {out / rel}")
        files[cls] = rel
    return files


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` except model.json (POSIX relative paths)."""
    return {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MODEL_JSON and not p.name.startswith(".")
    }


def json_safe(value: Any) -> Any:
    """Plain JSON types only (paths, numpy scalars and tuples become str / float / list)."""
    return json.loads(
        json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def build_card(
    ckpt: Checkpoint,
    *,
    name: str,
    encoder: GraphSpec,
    detector: GraphSpec,
    prompts: dict[str, str],
    precisions: dict[str, Precision],
    thresholds: Thresholds,
    checkpoint_sha256: str,
    versions: dict[str, str],
    hashes: dict[str, str],
) -> ModelCard:
    calib = ckpt.calibration
    source = str(calib.get("source") or "normal validation images")
    recipe = json_safe(ckpt.train_config)
    recipe.setdefault("model", json_safe(ckpt.model_config.model_dump(mode="json")))
    return ModelCard(
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        input_size=[ckpt.input_size, ckpt.input_size],
        color_order="RGB",
        resize="cv2-area",
        layout="NHWC",
        backbone=ckpt.model_config.backbone,
        recipe=recipe,
        classes=list(ckpt.classes),
        prompt_encoder=encoder,
        detector=detector,
        score_normalization=ScoreNormalization(
            image=Normalization(
                center=float(calib["image"]["center"]), scale=float(calib["image"]["scale"])
            ),
            pixel=Normalization(
                center=float(calib["pixel"]["center"]), scale=float(calib["pixel"]["scale"])
            ),
            source=f"{source} (checkpoint calibration, never test images)",
            count=max(1, int(calib.get("count") or 1)),
        ),
        thresholds=thresholds,
        precisions=precisions,
        checkpoint_sha256=checkpoint_sha256,
        checkpoint=str(ckpt.path.resolve()),
        data_fingerprint=str(ckpt.data_fingerprint or ""),
        trained_file_keys=list(ckpt.trained_file_keys),
        prompts=prompts,
        versions=versions,
        sha256=hashes,
    )


def finalize(out: Path, card: ModelCard) -> Path:
    """Re-hash every file and write model.json atomically, LAST."""
    card = card.model_copy(update={"sha256": file_hashes(out)})
    return write_card(out, card)
