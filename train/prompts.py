"""Choosing the prompt (the normal "golden sample") each test image is compared with.

A station has ONE fixed prompt, so that is what evaluation reports by default: the checkpoint's
golden sample per class (the trainer's choice), else the first training image of the class in
sorted order, or a named file. The official OneNIP code instead draws a random prompt of the test
image's TRUE class per image; we report the spread over a few random draws (one prompt per class
per draw) to show how much the choice matters. Class-agnostic retrieval needs no class label at
all: each query gets the pool prompt whose pooled backbone features are most cosine-similar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.runtime.errors import LineGuardError
from lineguard.train.data import Sample, load_image, resize_rgb


def train_rows_by_class(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Rows of the normal TRAINING samples of each class, in sorted (dataset, rel_path) order."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.split == "train" and s.label == 0:
            out.setdefault(s.category, []).append(i)
    for rows in out.values():
        rows.sort(key=lambda i: (samples[i].dataset, samples[i].rel_path))
    return out


def parse_prompt_spec(spec: str | None) -> tuple[str, dict[str, Path] | Path | None]:
    """`fixed` | `first` | `FILE` (every class) | `CLASS=FILE[,CLASS=FILE...]`."""
    if spec is None or spec == "fixed":
        return "fixed", None
    if spec == "first":
        return "first", None
    if "=" in spec:
        named: dict[str, Path] = {}
        for part in spec.split(","):
            cls, _, file = part.partition("=")
            if not cls or not file:
                raise LineGuardError(f"--prompt {spec!r}: expected CLASS=FILE[,CLASS=FILE...]")
            named[cls.strip()] = Path(file.strip())
        return "named", named
    return "file", Path(spec)


def fixed_prompts(
    classes: Sequence[str],
    samples: Sequence[Sample],
    images: np.ndarray,
    size: int,
    spec: str | None = "fixed",
    checkpoint_prompts: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, tuple[str, np.ndarray]]:
    """One prompt per class: `{class: (source description, uint8 size×size×3)}`.

    `fixed` takes the checkpoint's golden sample and falls back to the first training image of
    the class; `first` always takes the first training image; a file (or CLASS=FILE) names it.
    """
    mode, arg = parse_prompt_spec(spec)
    rows = train_rows_by_class(samples)
    out: dict[str, tuple[str, np.ndarray]] = {}
    for cls in classes:
        if mode == "file" or (mode == "named" and cls in arg):  # type: ignore[operator]
            path = arg if mode == "file" else arg[cls]  # type: ignore[index]
            if not Path(path).is_file():
                raise LineGuardError(f"prompt image {path} not found")
            out[cls] = (str(path), load_image(path, size))
            continue
        if mode == "fixed" and checkpoint_prompts and cls in checkpoint_prompts:
            p = checkpoint_prompts[cls]
            img = np.asarray(p["image"], np.uint8)
            out[cls] = (f"checkpoint:{p.get('path', cls)}", resize_rgb(img, size))
            continue
        if cls not in rows:
            raise LineGuardError(
                f"no prompt for class {cls!r}: the checkpoint has none and the data has no "
                "training images of it; name one with --prompt CLASS=FILE"
            )
        i = rows[cls][0]
        out[cls] = (samples[i].rel_path, images[i])
    return out


def random_prompt_draws(
    classes: Sequence[str], samples: Sequence[Sample], draws: int, seed: int = 0
) -> list[dict[str, int]]:
    """`draws` dicts `{class: row}`, each a uniformly random training image per class."""
    rows = train_rows_by_class(samples)
    missing = [c for c in classes if c not in rows]
    if missing:
        raise LineGuardError(f"random prompts need training images of: {', '.join(missing)}")
    rng = np.random.default_rng(seed)
    return [{c: int(rng.choice(rows[c])) for c in classes} for _ in range(draws)]


def to_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 B×H×W×3 -> float B×3×H×W in [0, 1] (the model's input convention)."""
    t = torch.as_tensor(np.ascontiguousarray(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def pooled_features(
    model: torch.nn.Module, images: np.ndarray, device: torch.device | str, batch_size: int = 32
) -> np.ndarray:
    """L2-normalised global-average-pooled backbone features, one row per image."""
    feats = []
    for a in range(0, len(images), batch_size):
        f = model.features(to_tensor(images[a : a + batch_size], device)).float()
        feats.append(torch.nn.functional.normalize(f.mean(dim=(2, 3)), dim=1).cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def retrieve_classes(
    model: torch.nn.Module,
    queries: np.ndarray,
    pool: np.ndarray,
    device: torch.device | str,
    batch_size: int = 32,
) -> np.ndarray:
    """Index into `pool` (one prompt image per class) of the most cosine-similar prompt."""
    q = pooled_features(model, queries, device, batch_size)
    p = pooled_features(model, pool, device, batch_size)
    return np.argmax(q @ p.T, axis=1)
