"""The OneNIP training loop: one process or many through ``torchrun`` (DDP).

Per step: a batch of normal images, a synthetic-defect copy of each, and for each a random
normal prompt of the same class (spec §1.3, §5). The backbone is frozen and there is no
augmentation, so the features of every normal image (which also serve as prompts) are computed
ONCE and cached on the device; only the synthetic images go through the backbone online. That
removes about 2/3 of the backbone work of the official code and changes no number.

After training (and at every checkpoint) the fusion scale c and the score normalisation are
measured on NORMAL validation images with each class's fixed golden prompt
(:mod:`lineguard.train.calibration`), and a proxy metric is logged: image AUROC of normal vs
synthetic-defect validation images — no test image is touched.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from lineguard.runtime.errors import LineGuardError
from lineguard.train import normal_stats
from lineguard.train.calibration import to_tensor
from lineguard.train.checkpoint import (
    checkpoint_payload,
    read_checkpoint,
    save_checkpoint,
)
from lineguard.train.cpu_parallel import world_size
from lineguard.train.losses import onenip_loss
from lineguard.train.proxy import (
    choose_map_blur,
    choose_match_weight,
    choose_stats_weight,
    judge_validation,
    proxy_and_calibration,
    synthetic_validation,
)
from lineguard.train.torch_model import OneNIP
from lineguard.train.train_config import TrainConfig
from lineguard.train.train_data import (
    EpochSampler,
    SyntheticDefects,
    load_training_data_for,
    make_synthesizer,
)

LOSS_PARTS = ("total", "mse", "dice")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    if world_size() <= 1:
        return Dist()
    if not dist.is_initialized():
        # rank 0 alone runs the proxy evaluations and the closing choices while the others
        # wait at a barrier: allow that a long wait (tiled validation sets), not the default 30 min
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2)
        )
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LineGuardError("device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


class TrainStep(nn.Module):
    """``forward`` = :meth:`OneNIP.forward_train`, so DDP sees a forward it can hook."""

    def __init__(self, model: OneNIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, synthetic, image=None, prompt=None, image_feats=None, prompt_feats=None):
        return self.model.forward_train(
            image, synthetic, prompt, image_feats=image_feats, prompt_feats=prompt_feats
        )


@torch.no_grad()
def cache_features(
    model: OneNIP, images: np.ndarray, device, autocast, batch_size: int = 32
) -> torch.Tensor:
    """Backbone+neck features of every image, on ``device``, under the training autocast."""
    out = []
    for start in range(0, len(images), batch_size):
        with autocast():
            out.append(model.features(to_tensor(images[start : start + batch_size], device)))
    return torch.cat(out)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU (AVX512-BF16 or AMX): bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Trainer:
    """Builds data, model and optimiser from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.t_start = time.perf_counter()
        self.dist = init_distributed(
            "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        )
        self.device = pick_device(cfg, self.dist)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.use_bf16 = cfg.bf16 and (self.device.type == "cuda" or cpu_has_bf16())
        self.data = load_training_data_for(cfg, progress=progress and self.dist.main)
        torch.manual_seed(cfg.seed)
        self.model = OneNIP(cfg.model).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, cfg.step_size(), cfg.lr_gamma
        )
        self.synth = make_synthesizer(self.data, cfg.synthesis)
        self.start_epoch, self.wall_time, self.history = 0, 0.0, []
        self.calibration: dict = {}
        self._val_defects = None
        self._judge_defects = None
        self._judge_map: np.ndarray | None = None  # the match choice's map, for the next choice
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # fitted, not yet chosen
        self._stats_fit_s = 0.0
        self.metrics: dict = {}
        if cfg.resume is not None:
            if cfg.budget is not None:
                raise LineGuardError("a budgeted run cannot resume: start it again with --budget")
            self._resume(cfg.resume)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _resume(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        # the map smoothing and the shares are chosen after training, not part of what trains
        chosen = {"map_blur_sigma", "match_weight", "match_zoom", "stats_weight"}
        mine = self.cfg.model.model_dump(mode="json", exclude=chosen)
        theirs = {k: v for k, v in ckpt["model_config"].items() if k not in chosen}
        if theirs != mine:
            raise LineGuardError(f"{path}: its model config differs from this run's `model:`")
        if ckpt["data_fingerprint"] != self.data.fingerprint:
            raise LineGuardError(f"{path}: trained on other data (fingerprint differs)")
        done = int(ckpt["epoch"])
        if done >= self.cfg.epochs:
            raise LineGuardError(f"{path} already has {done} epochs; raise --epochs to continue")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # A longer run moves the lr drop: recompute it in closed form for the new schedule.
        self.scheduler.step_size = self.cfg.step_size()
        lr = self.cfg.lr * self.cfg.lr_gamma ** (done // self.cfg.step_size())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scheduler._last_lr = [lr for _ in self.optimizer.param_groups]
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
        self.start_epoch = done
        self.wall_time = float(ckpt.get("wall_time_s", 0.0))
        self.history = list(ckpt["metrics"].get("history", []))

    def _loader(self, dataset: SyntheticDefects) -> torch.utils.data.DataLoader:
        base = torch.utils.data.DistributedSampler(
            dataset, self.dist.world, self.dist.rank, shuffle=True, seed=self.cfg.seed
        )
        workers = self.cfg.num_workers
        if workers > 0:
            # Workers are the parallelism; OpenCV's own pool in each would oversubscribe. Set it
            # here so forked workers inherit it: cv2.setNumThreads() INSIDE a forked worker can
            # deadlock on the parent's pool (seen with OpenCV 5.0 on the second run in a process).
            import cv2

            cv2.setNumThreads(1)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=EpochSampler(base, len(dataset)),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    # ------------------------------------------------------------------ training
    def _prepare(self):
        """Loader, cached features (or images) and the (DDP-wrapped) train step."""
        cfg, data, dev = self.cfg, self.data, self.device
        dataset = SyntheticDefects(
            data.train_images, data.train_labels, data.members(), self.synth, cfg.seed
        )
        loader = self._loader(dataset)
        feats = images = None
        if cfg.cache_features:
            feats = cache_features(self.model, data.train_images, dev, self.autocast)
        else:
            images = torch.from_numpy(data.train_images).to(dev)
        step: nn.Module = TrainStep(self.model)
        if self.dist.world > 1:
            # under CPU bf16 autocast the refiner's 1x64x1x1 head gets its gradient with
            # channels-last strides: for that shape the same memory as the parameter's, so DDP's
            # copy is 64 numbers, not worth the page of warning every run printed
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            ids = [dev.index] if dev.type == "cuda" else None
            step = nn.parallel.DistributedDataParallel(step, device_ids=ids)
        return loader, feats, images, step

    def _step(self, step: nn.Module, batch, feats, images) -> torch.Tensor:
        """One optimiser step on a loader batch; returns the detached loss parts."""
        dev = self.device
        rows, prompts, synthetic, mask = batch
        kw = {"synthetic": to_tensor(synthetic, dev)}
        if feats is not None:
            kw["image_feats"] = feats[rows.to(dev)]
            kw["prompt_feats"] = feats[prompts.to(dev)]
        else:
            kw["image"] = to_tensor(images[rows.to(dev)], dev)
            kw["prompt"] = to_tensor(images[prompts.to(dev)], dev)
        # enable_grad: a caller (or an earlier command in this process) may have turned
        # autograd off globally
        with torch.enable_grad():
            with self.autocast():
                out = step(**kw)
            loss, parts = onenip_loss(out, mask.to(dev, non_blocking=True))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        return torch.stack([parts[k].float() for k in LOSS_PARTS])

    def fit(self, stop_epoch: int | None = None) -> Path:
        """Train to ``cfg.epochs`` (or the budget); returns ``out_dir/final.pt``.

        ``stop_epoch`` ends the run early after that epoch with ``last.pt`` written and no
        ``final.pt`` (a time-boxed job; resume continues the same schedule).
        """
        if self.cfg.budget is not None:
            from lineguard.train.budget_fit import fit_budget

            return fit_budget(self)
        cfg, dev = self.cfg, self.device
        loader, feats, images, step = self._prepare()
        end = (
            cfg.epochs if stop_epoch is None else max(self.start_epoch, min(stop_epoch, cfg.epochs))
        )
        remaining = end - self.start_epoch
        bar = tqdm(
            total=remaining * len(loader),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and self.dist.main),
        )
        out_dir = Path(cfg.out_dir)
        final = out_dir / "final.pt"
        for epoch in range(self.start_epoch, end):
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            loader.sampler.set_epoch(epoch)
            self.model.train()
            sums = torch.zeros(len(LOSS_PARTS), device=dev)  # on device: no sync per step
            n = 0
            for batch in loader:
                sums += self._step(step, batch, feats, images)
                n += 1
                bar.update(1)
                if n % 10 == 1 or n == len(loader):
                    bar.set_postfix(
                        epoch=f"{epoch + 1}/{cfg.epochs}",
                        loss=f"{sums[0].item() / n:.4f}",
                        lr=f"{self.optimizer.param_groups[0]['lr']:.0e}",
                    )
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            seconds = time.perf_counter() - t0
            self.wall_time += seconds
            row = self._history_row(epoch + 1, lr, n, seconds, cpu0, sums)
            last = epoch + 1 == end
            due = cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0
            if self.dist.main:
                _append_log(out_dir / "train_log.jsonl", row)
                if due or last:
                    self._checkpoint(out_dir / "last.pt", epoch + 1, final=epoch + 1 == cfg.epochs)
            if self.dist.world > 1:
                dist.barrier()
        bar.close()
        if self.dist.main and end == cfg.epochs:
            shutil.copyfile(out_dir / "last.pt", out_dir / ".final.pt.tmp")
            os.replace(out_dir / ".final.pt.tmp", final)
        if self.dist.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return final

    def _history_row(self, epoch, lr, n, seconds, cpu0, sums) -> dict:
        row = {
            "epoch": epoch,
            "lr": lr,
            "steps": n,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(_cpu_seconds() - cpu0, 3),
            **dict(zip(LOSS_PARTS, (sums / max(n, 1)).tolist(), strict=True)),
        }
        self.history.append(row)
        return row

    def val_defects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fixed synthetic defects of the validation images, drawn once."""
        if self._val_defects is None:
            self._val_defects = synthetic_validation(self.data, self.synth, self.cfg.seed)
        return self._val_defects

    def judge_defects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The held-out judge defects of the validation images (the match choice), drawn once."""
        if self._judge_defects is None:
            self._judge_defects = judge_validation(self.data, self.cfg.seed)
        return self._judge_defects

    def evaluate_proxy(self) -> dict[str, float]:
        """Measure c and the normalisation on normal validation images, and the proxy."""
        proxy, self.calibration = proxy_and_calibration(
            self.model, self.data, self.val_defects(), self.device
        )
        return proxy

    def choose_map_blur(self) -> dict:
        """Pick the map smoothing on validation (:func:`choose_map_blur`); calibrates with it."""
        record, self.calibration = choose_map_blur(
            self.model, self.data, self.val_defects(), self.device
        )
        return record

    def choose_match(self) -> dict:
        """Pick the prompt-match share on held-out judge defects, then recalibrate with it."""
        if len(self.data.val_images) == 0:
            return {"weight": 0.0, "why": "no validation images to judge it on"}
        info, self.calibration, self._judge_map = choose_match_weight(
            self.model, self.data, self.device, self.judge_defects()
        )
        return info

    def choose_stats(self) -> dict:
        """Pick the normal statistics' share on held-out judge defects (after the prompt match;
        fitted here unless :meth:`fit_stats` ran already) and recalibrate with it."""
        if not self.cfg.normal_stats:
            return {"weight": 0.0, "why": "normal_stats is off in the recipe"}
        if len(self.data.val_images) == 0 or self._judge_map is None:
            return {"weight": 0.0, "why": "no validation images to judge it on"}
        if self._stats is None:
            self.fit_stats()
        assert self._stats is not None
        self.model.set_normal_stats(*self._stats)
        info, self.calibration = choose_stats_weight(
            self.model, self.data, self.device, self.judge_defects(), self._judge_map
        )
        fit_s = round(self._stats_fit_s, 2)
        return {**info, "fit_s": fit_s, "images": len(self.data.train_images)}

    @property
    def wants_stats(self) -> bool:
        """The recipe asks for the normal statistics and validation images can judge them."""
        return self.cfg.normal_stats and len(self.data.val_images) > 0

    def fit_stats(self) -> None:
        """Fit the normal statistics on the training split and keep them aside for
        :meth:`choose_stats`. The backbone is frozen, so a budgeted run fits them before its
        first step: their cost is then measured, not guessed in the closing reserve (a guess
        that missed the fixed cost of inverting every position's covariance, ~4 s, and ran a
        12-s run over its budget on a loaded machine)."""
        if not self.wants_stats:
            return
        t0 = time.perf_counter()
        self._stats = normal_stats.fit_backbone(self.model, self.data.train_images, self.device)
        self._stats_fit_s = time.perf_counter() - t0

    def payload(self, epoch: int) -> dict:
        """The checkpoint dict of the model as it is now (calibration must be current)."""
        data = self.data
        return {
            **checkpoint_payload(self.model, self.cfg, data, self.calibration, self.metrics, epoch),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "wall_time_s": self.wall_time,
            "split": {
                "train": [f"{s.dataset}/{s.rel_path}" for s in data.train],
                "val": [f"{s.dataset}/{s.rel_path}" for s in data.val],
            },
        }

    def _checkpoint(self, path: Path, epoch: int, final: bool = False) -> None:
        """Calibrate on normal validation images, then write the checkpoint atomically. The
        final one also chooses the map smoothing on validation."""
        proxy = self.evaluate_proxy()
        blur = self.choose_map_blur() if final else None
        match = self.choose_match() if final else None
        stats = self.choose_stats() if final else None
        self.metrics = {
            **proxy,
            **({"map_blur": blur} if blur else {}),
            **({"prompt_match": match} if match else {}),
            **({"normal_stats": stats} if stats else {}),
            **{f"train_{k}": v for k, v in self.history[-1].items() if k not in ("epoch",)},
            "seconds_per_epoch": self.wall_time / max(len(self.history), 1),
            "run_wall_s": time.perf_counter() - self.t_start,  # this invocation, setup included
            "history": self.history,
        }
        save_checkpoint(path, self.payload(epoch))


def _cpu_seconds() -> float:
    """CPU time of this process and its DataLoader workers (live and finished), all threads."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return total


def _append_log(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run a full training; returns the final checkpoint path."""
    return Trainer(cfg, progress).fit()
