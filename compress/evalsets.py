"""Image sets the compress stage measures on, all at the model's input size.

* calibration for INT8: NORMAL training images of the checkpoint's data (never test images);
* the INT8 accuracy gate: a labelled MVTec-layout test set when given, else the checkpoint's
  NORMAL validation images plus a synthetic-defect copy of each (the train stage's synthesis, so
  defects look like what the refiner learned, and masks are exact);
* the export parity gate: a few validation images and synthetic defects of them; with no data at
  hand, the golden prompts stored in the checkpoint and synthetic defects of those.

The checkpoint's recipe says where its data lives and how validation was split; `data` overrides
the location (the GPU box that trained it may have had other paths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineguard.compress.checkpoint import Checkpoint
from lineguard.runtime.errors import LineGuardError
from lineguard.train.pack import open_data
from lineguard.train.synthesis import DefectSynthesizer, SynthesisConfig
from lineguard.train.train_config import DataConfig, MvtecSource, TrainConfig
from lineguard.train.train_data import TrainingData, load_training_data_for, make_synthesizer

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Images with labels and masks, each tied to the class whose golden prompt scores it."""

    description: str
    images: np.ndarray  # N×S×S×3 uint8 RGB
    classes: list[str]  # per image
    labels: np.ndarray  # N, 0 normal / 1 defective
    masks: np.ndarray  # N×S×S uint8 {0, 1}

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int]) -> EvalSet:
        idx = list(idx)
        return EvalSet(
            self.description,
            self.images[idx],
            [self.classes[i] for i in idx],
            self.labels[idx],
            self.masks[idx],
        )


def train_config(ckpt: Checkpoint) -> TrainConfig:
    try:
        return TrainConfig.model_validate(ckpt.train_config)
    except ValueError as exc:
        raise LineGuardError(f"{ckpt.path}: train_config is not a valid recipe: {exc}") from exc


def data_config(ckpt: Checkpoint, data: Path | None) -> DataConfig:
    """The checkpoint's data sources, or `data` (an MVTec root or a pack) in their place."""
    if data is None:
        return train_config(ckpt).data
    data = Path(data)
    if data.suffix == ".npz":
        return DataConfig(pack=data)
    return DataConfig(mvtec=[MvtecSource(root=data, categories=ckpt.classes)])


def normal_data(ckpt: Checkpoint, data: Path | None = None) -> TrainingData:
    """NORMAL train/val images split exactly as in training (same fraction and seed)."""
    tc = train_config(ckpt)
    cfg = data_config(ckpt, data)
    try:
        td = load_training_data_for(tc, data=cfg, size=ckpt.input_size)
    except LineGuardError as exc:
        raise LineGuardError(
            f"cannot read the training data of {ckpt.path}: {exc}; pass --data ROOT|PACK"
        ) from exc
    unknown = sorted(set(td.classes) - set(ckpt.classes))
    if unknown:
        raise LineGuardError(f"data holds classes the checkpoint was not trained on: {unknown}")
    return td


def synthesizer(ckpt: Checkpoint, td: TrainingData | None) -> DefectSynthesizer:
    """The recipe's defect synthesis (procedural textures when no training images are at hand)."""
    synth_cfg = train_config(ckpt).synthesis if ckpt.train_config else SynthesisConfig()
    if td is None:
        return DefectSynthesizer(synth_cfg.model_copy(update={"textures": "procedural"}))
    return make_synthesizer(td, synth_cfg)


def with_synthetic(
    description: str,
    images: np.ndarray,
    classes: list[str],
    synth: DefectSynthesizer,
    seed: int,
    class_ids: dict[str, int] | None = None,
    defects: int = 1,
) -> EvalSet:
    """Each normal image plus `defects` synthetic-defect copies (masks from the synthesis)."""
    rng = np.random.default_rng(seed)
    n, s = len(images), images.shape[1]
    total = n * (1 + defects)
    out_img = np.empty((total, s, s, 3), np.uint8)
    out_mask = np.zeros((total, s, s), np.uint8)
    out_img[:n] = images
    for k in range(defects):
        for i, img in enumerate(images):
            label = None if class_ids is None else class_ids.get(classes[i])
            defect, mask = synth(img, rng, label)
            out_img[n * (1 + k) + i] = defect
            out_mask[n * (1 + k) + i] = (np.asarray(mask) > 0).astype(np.uint8)
    labels = (out_mask.reshape(total, -1).max(1) > 0).astype(np.int64)
    return EvalSet(description, out_img, list(classes) * (1 + defects), labels, out_mask)


def per_class_rows(classes: list[str], limit: int | None, seed: int) -> list[int]:
    """Up to `limit` rows per class, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    rows: list[int] = []
    for cls in sorted(set(classes)):
        idx = np.flatnonzero(np.asarray(classes) == cls)
        if limit is not None and len(idx) > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        rows += idx.tolist()
    return rows


def validation_set(
    ckpt: Checkpoint,
    td: TrainingData,
    per_class: int | None = None,
    seed: int = 0,
    defects: int = 4,
) -> EvalSet:
    """NORMAL validation images + `defects` synthetic defects of each (INT8 gate, no labels).

    Validation sets are small (10 % of a class's normal images); several defects per image
    give each class's AUROC n·k normal/defect pairs instead of n, so one swapped pair no longer
    moves the mean by more than the 0.5 pt budget.
    """
    if len(td.val_images) == 0:
        raise LineGuardError(
            f"{ckpt.path}: the recipe held out no validation images (val_fraction 0); "
            "give a labelled set with --labelled ROOT"
        )
    classes = [td.classes[i] for i in td.val_labels]
    rows = per_class_rows(classes, per_class, seed)
    return with_synthetic(
        f"{len(rows)} normal validation images + {defects} synthetic defects of each",
        td.val_images[rows],
        [classes[i] for i in rows],
        synthesizer(ckpt, td),
        seed,
        {c: i for i, c in enumerate(td.classes)},
        defects,
    )


def labelled_set(
    root: Path, ckpt: Checkpoint, per_class: int | None = None, seed: int = 0
) -> EvalSet:
    """The TEST split of an MVTec-layout dataset (labels from folders, masks from ground truth)."""
    pack = open_data(root, ckpt.input_size, categories=None, progress=False)
    pack = pack.select(lambda s: s.split == "test" and s.category in ckpt.classes)
    if len(pack) == 0:
        raise LineGuardError(f"{root}: no test images of the classes {ckpt.classes}")
    classes = [s.category for s in pack.samples]
    rows = per_class_rows(classes, per_class, seed)
    return EvalSet(
        f"labelled test split of {root} ({len(rows)} images)",
        pack.images[rows],
        [classes[i] for i in rows],
        np.array([pack.samples[i].label for i in rows], np.int64),
        pack.masks[rows].astype(np.uint8),
    )


def parity_set(
    ckpt: Checkpoint, td: TrainingData | None, per_class: int = 2, seed: int = 0
) -> EvalSet:
    """A small, varied set for the export parity gate: normal images and synthetic defects."""
    if td is not None and len(td.val_images):
        classes = [td.classes[i] for i in td.val_labels]
        rows = per_class_rows(classes, per_class, seed)
        images, cls = td.val_images[rows], [classes[i] for i in rows]
        what = "normal validation images"
    else:
        cls = list(ckpt.classes)
        images = np.stack([ckpt.prompts[c] for c in cls])
        what = "golden prompts (no training data at hand)"
    # a rank correlation needs a few distinct scores: more defect draws when images are few
    defects = 1 if len(images) >= 3 else 3
    return with_synthetic(
        f"{len(images)} {what} + {defects} synthetic defect(s) of each",
        images,
        cls,
        synthesizer(ckpt, td),
        seed,
        defects=defects,
    )


def try_normal_data(ckpt: Checkpoint, data: Path | None) -> TrainingData | None:
    """`normal_data`, or None (with a warning) when the data cannot be found."""
    try:
        return normal_data(ckpt, data)
    except LineGuardError as exc:
        log.warning("no training data for the parity set (%s); using the golden prompts", exc)
        return None
