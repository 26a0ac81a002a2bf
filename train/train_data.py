"""Training data in memory: normal images per class, the validation split, golden prompts,
and the per-sample defect synthesis the DataLoader runs.

All normal images are held decoded at training resolution (uint8): MVTec AD at 256 px is about
700 MB, and it lets every worker draw prompts and texture images without touching the disk.
Randomness of a sample depends only on (seed, epoch, index), never on the worker that happens to
draw it, so any worker count and a resumed run reproduce the same synthetic defects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lineguard.runtime.errors import LineGuardError
from lineguard.train.data import Sample, scan_folder, scan_mvtec, split_validation
from lineguard.train.pack import Pack, build_pack, load_pack
from lineguard.train.synthesis import DefectSynthesizer
from lineguard.train.textures import TextureSource
from lineguard.train.train_config import DataConfig, TrainConfig


@dataclass
class TrainingData:
    """Normal train/val images (uint8 N×S×S×3), integer labels into ``classes``, prompts."""

    classes: list[str]
    train: list[Sample]
    train_images: np.ndarray
    train_labels: np.ndarray
    val: list[Sample]
    val_images: np.ndarray
    val_labels: np.ndarray
    prompt_index: list[int]  # per class: row of train_images used as the default prompt
    fingerprint: str
    train_sha256: list[str] = field(default_factory=list)  # of each training image's file

    def members(self) -> list[np.ndarray]:
        """Training rows of each class (the random-prompt pool during training)."""
        return [np.flatnonzero(self.train_labels == c) for c in range(len(self.classes))]

    def prompt_images(self) -> list[np.ndarray]:
        return [self.train_images[i] for i in self.prompt_index]


def _normal_pack(cfg: DataConfig, size: int, progress: bool) -> Pack:
    """The NORMAL training images (train/good and plain folders) of every source, one Pack."""
    if cfg.is_empty():
        raise LineGuardError(
            "no training data: set data.mvtec / data.folders / data.pack in the config "
            "or pass --data ROOT"
        )
    if cfg.pack is not None:
        if cfg.mvtec or cfg.folders:
            raise LineGuardError("data.pack cannot be combined with data.mvtec / data.folders")
        pack = load_pack(cfg.pack, progress=progress)
        if pack.size > size:
            raise LineGuardError(
                f"pack {cfg.pack} holds images at {pack.size} px but the model input is {size} "
                f"px; re-pack with --size {size}"
            )
        return pack.select(lambda s: s.split == "train" and s.label == 0).upsized(size)
    samples: list[Sample] = []
    for src in cfg.mvtec:
        samples += [s for s in scan_mvtec(src.root, src.categories) if s.split == "train"]
    for src in cfg.folders:
        samples += scan_folder(src.path, src.category)
    return build_pack(samples, size, progress=progress)


def load_training_data(
    cfg: DataConfig,
    size: int,
    val_fraction: float,
    seed: int,
    progress: bool = True,
    val_min: int = 8,
) -> TrainingData:
    """Read (or unpack) the normal images, split off validation, pick the default prompts.

    Classes are category names; the same name from several sources is ONE class. The default
    prompt of a class is its first TRAINING image (validation excluded) in sorted order.
    """
    pack = _normal_pack(cfg, size, progress)
    if len(pack) == 0:
        raise LineGuardError("the data sources hold no normal training images")
    row = pack.index_of()
    train, val = split_validation(pack.samples, val_fraction, seed, val_min)
    classes = sorted({s.category for s in train})
    cls_id = {c: i for i, c in enumerate(classes)}
    train_rows = [row[(s.dataset, s.rel_path)] for s in train]
    val_rows = [row[(s.dataset, s.rel_path)] for s in val]
    train_labels = np.array([cls_id[s.category] for s in train], np.int64)
    prompt_index = []
    for c in range(len(classes)):
        rows = np.flatnonzero(train_labels == c)
        prompt_index.append(min(rows, key=lambda i: (train[i].dataset, train[i].rel_path)))
    return TrainingData(
        classes=classes,
        train=train,
        train_images=pack.images[train_rows],
        train_labels=train_labels,
        val=val,
        val_images=pack.images[val_rows],
        val_labels=np.array([cls_id[s.category] for s in val], np.int64),
        prompt_index=[int(i) for i in prompt_index],
        fingerprint=pack.fingerprint,
        train_sha256=[pack.hashes[i] for i in train_rows],
    )


def load_training_data_for(
    cfg: TrainConfig,
    progress: bool = False,
    data: DataConfig | None = None,
    size: int | None = None,
) -> TrainingData:
    """:func:`load_training_data` as the recipe `cfg` builds it (its data sources, model input
    size, validation fraction, seed and val_min): the same split training made. ``data`` stands
    in for the recipe's sources where the images are now elsewhere, ``size`` for its input size.
    """
    return load_training_data(
        cfg.data if data is None else data,
        cfg.model.input_size if size is None else size,
        cfg.val_fraction,
        cfg.seed,
        progress=progress,
        val_min=cfg.val_min,
    )


def make_synthesizer(data: TrainingData, synth_cfg) -> DefectSynthesizer:
    """Synthesizer whose image textures come from the training images (other classes first)."""
    kind = synth_cfg.textures
    if kind != "procedural":
        textures = TextureSource(kind, data.train_images, data.train_labels)
    else:
        textures = TextureSource("procedural")
    return DefectSynthesizer(synth_cfg, textures)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Yields ``epoch · N + i`` for the rows ``i`` of a DistributedSampler.

    Carrying the epoch inside the index lets DataLoader workers stay alive across epochs
    (``persistent_workers``: no re-fork per epoch, which costs more than a short epoch on a
    GPU) while every sample still knows its epoch for seeding.
    """

    def __init__(self, base: torch.utils.data.DistributedSampler, n: int) -> None:
        self.base, self.n = base, n

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self):
        offset = self.base.epoch * self.n
        return (offset + int(i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class SyntheticDefects(torch.utils.data.Dataset):
    """Item ``epoch · N + i``: (i, prompt row, synthetic image uint8 H×W×3, mask float32 H×W).

    The normal image and the prompt are returned as ROWS, not pixels: the trainer takes their
    cached backbone features (or pixels) from memory, so workers only synthesise. The epoch
    comes in the index (see :class:`EpochSampler`); a plain index < N means epoch 0.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        members: list[np.ndarray],
        synthesizer: DefectSynthesizer,
        seed: int,
    ) -> None:
        self.images, self.labels, self.members = images, labels, members
        self.synthesizer, self.seed = synthesizer, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), len(self.images))
        rng = np.random.default_rng([self.seed, epoch, i])
        label = int(self.labels[i])
        pool = self.members[label]
        prompt = int(pool[int(rng.integers(len(pool)))])
        image, mask = self.synthesizer(self.images[i], rng, label)
        return i, prompt, torch.from_numpy(image), torch.from_numpy(mask)
