"""The training recipe as a pydantic model, and loading it from YAML with file:line:key errors.

A recipe names its data, the model architecture (:class:`OneNIPConfig`), the synthesis mix and
the optimisation schedule of the official code (spec §9), scaled to any epoch count: AdamW
(lr 1e-4, wd 1e-4), StepLR ×0.1 at 80 % of the epochs, gradient-norm clip 0.1, batch 8 per
process. Relative paths written in a YAML file (data, ``out_dir``, ``resume``) are resolved
against the file's folder, as in the runtime's configs, so a recipe works from any working
directory; paths given on the command line, and the default ``out_dir``, are relative to the
working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from lineguard.runtime.config_loader import ConfigError, ConfigIssue, display_path, parse_yaml
from lineguard.train.budget import parse_budget
from lineguard.train.synthesis import SynthesisConfig
from lineguard.train.torch_model import OneNIPConfig


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths -> against the YAML file's folder (validation context ``base_dir``)."""
    if value is None:
        return None
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


class MvtecSource(BaseModel):
    """A dataset in the MVTec AD layout (``<category>/train/good/*``)."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(title="dataset folder (or one category folder)")
    categories: list[str] | None = Field(None, title="categories to use; all when omitted")

    _abs = field_validator("root")(_resolve)


class FolderSource(BaseModel):
    """A plain folder of normal captures of ONE product (searched recursively)."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(title="folder of normal images")
    category: str = Field(min_length=1, title="class name these images belong to")

    _abs = field_validator("path")(_resolve)


class DataConfig(BaseModel):
    """Where the normal training images come from; all sources feed ONE model."""

    model_config = ConfigDict(extra="forbid")

    mvtec: list[MvtecSource] = Field(default_factory=list, title="MVTec-layout datasets")
    folders: list[FolderSource] = Field(
        default_factory=list, title="plain folders of normal images"
    )
    pack: Path | None = Field(
        None, title="pack file from `lineguard data pack` (instead of images)"
    )

    _abs = field_validator("pack")(_resolve)

    def is_empty(self) -> bool:
        return not self.mvtec and not self.folders and self.pack is None


class TrainConfig(BaseModel):
    """One training run: data, model, synthesis, schedule, hardware and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig, title="training data sources")
    model: OneNIPConfig = Field(default_factory=OneNIPConfig, title="OneNIP architecture")
    synthesis: SynthesisConfig = Field(
        default_factory=SynthesisConfig, title="synthetic defect mix"
    )
    budget: float | None = Field(
        None,
        title="wall-clock training budget in seconds (or '30m', '1.5h'); replaces `epochs`",
        description="The lr schedule (warm-up, cosine decay) spans the steps, from the first one "
        "to the budget less a reserve for the closing choices; the checkpoint with the best "
        "validation proxy is kept as final.pt.",
    )
    warmup_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        title="budget mode: share of the training span spent warming the lr up",
    )
    min_lr_fraction: float = Field(
        0.02, ge=0.0, le=1.0, title="budget mode: cosine decays the lr to this share of `lr`"
    )
    proxy_evals: int = Field(
        8, ge=1, title="budget mode: validation-proxy evaluations spread over the training span"
    )
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        title="budget mode: decay of a weight average scored beside the raw weights (0 = off)",
        description="When on (e.g. 0.999), every proxy evaluation also scores the running "
        "average of the weights and the better of the two on the validation proxy is kept. Off "
        "by default: on mtd its best proxy stayed below the raw weights' (0.7336 vs 0.7355).",
    )
    save_evaluations: bool = Field(
        False,
        title="budget mode: also write every evaluated checkpoint to OUT/evaluations/",
        description="For studies of how the validation proxy ranks checkpoints "
        "(benchmarks/checkpoint_ranking.py); final.pt is chosen the same way either way.",
    )
    normal_stats: bool = Field(
        True,
        title="after training, fit the normal statistics and choose their share of the map",
        description="A per-position Gaussian of the training images' descriptors "
        "(train/normal_stats.py), one backbone pass over them; its share (0 drops it) is "
        "chosen on held-out validation defects. Off: the map is the learned one (and the "
        "prompt match) only.",
    )
    epochs: int = Field(100, ge=1, title="training epochs (the paper: 1000; ignored with budget)")
    batch_size: int = Field(8, ge=1, title="normal images per process and step (spec: 8)")
    lr: float = Field(1e-4, gt=0.0, title="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, title="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), title="AdamW betas")
    lr_step_fraction: float = Field(
        0.8, gt=0.0, le=1.0, title="StepLR drops the lr after this fraction of the epochs"
    )
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0, title="StepLR factor")
    grad_clip: float = Field(0.1, gt=0.0, title="max global gradient norm (spec: 0.1)")
    seed: int = Field(133, title="seed of model init, sampling, synthesis and the val split")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, title="share of each class's normal images held out for calibration"
    )
    val_min: int = Field(
        8,
        ge=0,
        title="at least this many validation images per class (at most half of the class)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", title="auto = cuda when available")
    bf16: bool = Field(
        True, title="bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX)"
    )
    num_workers: int = Field(4, ge=0, title="DataLoader worker processes (defect synthesis)")
    threads: int | None = Field(
        None, ge=1, title="torch CPU threads per process (None = torch default)"
    )
    processes: int = Field(
        1,
        ge=1,
        title="CPU only: data-parallel training processes on this machine (gloo); batch_size "
        "is per process, so the step's batch is processes x batch_size",
    )
    cache_features: bool = Field(
        True,
        title="compute frozen-backbone features of normal images once (exact: no augmentation)",
    )
    out_dir: Path = Field(Path("runs/train"), title="folder for checkpoints and the training log")
    checkpoint_every: int = Field(
        10, ge=0, title="write last.pt every N epochs (0 = only at the end)"
    )
    resume: Path | None = Field(None, title="checkpoint to continue from (same data and model)")

    _abs = field_validator("out_dir", "resume")(_resolve)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: object) -> float | None:
        if value is None:
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError("budget: expected seconds or a string like '30m'")
        return parse_budget(value)

    def step_size(self) -> int:
        """Epochs at the initial lr before the StepLR drop (spec: 800 of 1000)."""
        return max(1, round(self.lr_step_fraction * self.epochs))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply ``overrides`` (top-level keys, already-resolved values), validate.

    Every problem is reported as ``file:line: key: message`` (a :class:`ConfigError`).
    """
    path = Path(path)
    parsed = parse_yaml(path)
    shown = display_path(path)
    if parsed.issues:
        raise ConfigError(parsed.issues)
    data = parsed.data
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(shown, 1, "", "expected a mapping of keys at the top level")]
        )
    data = _merge(data, overrides or {})
    try:
        return TrainConfig.model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            msg = err["msg"].removeprefix("Value error, ")
            issues.append(ConfigIssue(shown, parsed.line_of(loc), key, msg))
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0)) from None
