"""The budgeted training loop: train until the wall-clock budget is spent, keep the best proxy.

Everything from the feature cache on counts against the budget, proxy evaluations included, so
``wall_time_s <= budget_s`` holds for the whole run. The lr follows the budget (see
:mod:`lineguard.train.budget`); every proxy evaluation scores the weights (and, with
``ema_decay``, their running average: :mod:`lineguard.train.weight_average`), each a point
``{wall_s, weights, val_proxy, ...}`` of the curve, and the weights with the best proxy so far
are written to ``best.pt`` at once (a crash keeps the best model). At the end they become
``final.pt``, whose metrics hold the budget, the wall time and the whole curve. Under
``torchrun`` rank 0's clock decides for every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from lineguard.train.budget import CLOSING_SPARE, BudgetClock
from lineguard.train.checkpoint import save_checkpoint
from lineguard.train.proxy import BLUR_SIGMAS, MATCH_WEIGHTS, MATCH_ZOOMS
from lineguard.train.weight_average import WeightAverage

if TYPE_CHECKING:
    from lineguard.train.trainer import Trainer

T = TypeVar("T")


def closing_evaluations(stats: int = 0) -> int:
    """The work after the last step, in proxy evaluations: the final proxy, one per map blur
    tried, then the prompt-match choice, which scores the judge set once per zoom (an upsampled
    backbone pass costs up to zoom² a plain one) and measures every share tried (the measuring
    is most of an evaluation where the validation set is large, e.g. tiles): the larger of the
    two counts; then the normal statistics' ``stats`` (their map of the judge set: 1; they are
    fitted before the first step, :meth:`Trainer.fit_stats`)."""
    return 1 + len(BLUR_SIGMAS) + match_evaluations() + stats


def match_evaluations() -> int:
    """The prompt-match choice in proxy evaluations (see :func:`closing_evaluations`)."""
    passes = sum(z * z for z in MATCH_ZOOMS)
    tries = len(MATCH_WEIGHTS) + (len(MATCH_ZOOMS) - 1) * (len(MATCH_WEIGHTS) - 1)
    return max(passes, tries)


@contextmanager
def _all_cores(tr: Trainer) -> Iterator[None]:
    """Rank 0 evaluates alone while the other CPU ranks wait at a barrier: lend it their cores."""
    if tr.dist.world <= 1 or tr.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _agree(tr: Trainer, *flags: bool) -> list[bool]:
    """Rank 0's decisions, broadcast so every DDP rank stops / evaluates at the same step."""
    if tr.dist.world <= 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=tr.device)
    dist.broadcast(t, 0)
    return [bool(v) for v in t.tolist()]


class _Run:
    """State of one budgeted run: clock, curve, best weights."""

    def __init__(self, tr: Trainer) -> None:
        cfg = tr.cfg
        assert cfg.budget is not None
        self.tr = tr
        # rank 0 alone evaluates, so it alone keeps the average
        self.average = (
            WeightAverage(tr.model, cfg.ema_decay) if cfg.ema_decay > 0 and tr.dist.main else None
        )
        # the statistics' share choice: one map of the judge set (fitted before training)
        self.stats_evaluations = int(tr.wants_stats)
        self.clock = BudgetClock(
            cfg.budget,
            cfg.warmup_fraction,
            cfg.min_lr_fraction,
            cfg.proxy_evals,
            # the last evaluation scores the average too
            closing_evals=closing_evaluations(self.stats_evaluations) + (self.average is not None),
        )
        self.curve: list[dict] = []
        self.best_proxy = -math.inf
        self.best_state: dict | None = None
        self.best_calibration: dict = {}
        self.best_point: dict = {}
        self.steps = 0
        self.epoch = 0
        self.loss = float("nan")
        self.load_start = round(os.getloadavg()[0], 2)

    def evaluate(self) -> None:
        """Proxy + calibration of the raw weights and, if on, of their running average;
        keep (and write) whichever is the best yet."""
        tr = self.tr
        tr.val_defects()  # drawn once, at the first evaluation: not a cost of every one
        tr.judge_defects()  # ... and so are the closing match choice's (untimed in the reserve)
        self._candidate("raw")
        if self.average is not None and self.average.updates:
            with self.average.swapped_in():
                self._candidate("average")

    def _candidate(self, weights: str) -> None:
        """Score the model's weights as they are now; a curve point, and best.pt if best."""
        tr = self.tr
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        proxy = tr.evaluate_proxy()
        # per candidate: the closing choices that the reserve is for score one set of weights
        self.clock.record_eval(time.perf_counter() - t0)
        point = {
            "wall_s": round(self.clock.elapsed(), 2),
            "step": self.steps,
            "epoch": self.epoch,
            "weights": weights,
            "lr": tr.optimizer.param_groups[0]["lr"],
            "loss": self.loss,
            "loadavg_1m": round(os.getloadavg()[0], 2),  # the machine's load with each figure
            **proxy,
        }
        self.curve.append(point)
        if tr.cfg.save_evaluations:  # every candidate, for studies of the proxy's ranking
            saved = {**tr.payload(self.epoch), "metrics": {**proxy, "point": point}}
            save_checkpoint(
                Path(tr.cfg.out_dir) / "evaluations" / f"step{self.steps:06d}_{weights}.pt", saved
            )
        value = proxy.get("val_proxy", -math.inf)
        if self.best_state is None or value > self.best_proxy:
            self.best_proxy = value
            self.best_point = point
            self.best_calibration = dict(tr.calibration)
            self.best_state = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            tr.metrics = self.metrics()
            save_checkpoint(Path(tr.cfg.out_dir) / "best.pt", tr.payload(self.epoch))

    def metrics(self) -> dict:
        tr = self.tr
        return {
            **{k: v for k, v in self.best_point.items() if k.startswith("val_")},
            "budget_s": tr.cfg.budget,
            "wall_time_s": round(self.clock.elapsed(), 2),
            "steps": self.steps,
            "best": self.best_point,
            "curve": self.curve,
            "bf16": tr.use_bf16,
            "loadavg": {
                "at_start": self.load_start,
                "mean_at_evaluations": round(
                    sum(p["loadavg_1m"] for p in self.curve) / max(len(self.curve), 1), 2
                ),
            },
            "device": str(tr.device),
            "processes": tr.dist.world,
            "seconds_per_epoch": tr.wall_time / max(len(tr.history), 1),
            "run_wall_s": time.perf_counter() - tr.t_start,
            "history": tr.history,
        }


class _ClosingPace:
    """Runs each closing part only if it still fits: its cost in the slowest evaluation seen,
    with the reserve's ``CLOSING_SPARE``, times how much slower than that estimate the parts
    already done ran (a machine that turns busy after the last step makes every later part
    slower too). On a steady machine nothing is skipped: the reserve kept the same spare."""

    def __init__(self, clock: BudgetClock) -> None:
        self.clock = clock
        self.estimated = 0.0
        self.took = 0.0

    def part(
        self, evals: float, work: Callable[[], T], skipped: Callable[[str], T], force: bool = False
    ) -> T:
        """``work()`` if a part costing ``evals`` proxy evaluations fits (or ``force``), else
        ``skipped(why)``."""
        clock = self.clock
        slow = max(1.0, self.took / self.estimated) if self.estimated > 0 else 1.0
        need = CLOSING_SPARE * evals * clock.max_eval_s * slow  # the reserve's spare, too
        if clock.left() < need and not force:
            left = max(clock.left(), 0.0)
            return skipped(f"skipped for the budget: {left:.1f} s left, about {need:.1f} s needed")
        estimate, since = evals * clock.max_eval_s, clock.elapsed()
        out = work()
        self.estimated += estimate
        self.took += clock.elapsed() - since
        return out


def _close(tr: Trainer, run: _Run) -> tuple[dict, dict, dict, str]:
    """The work after the last step, each part only if it still fits in the budget.

    Why a check per part and not only the reserve: the reserve is an estimate made while
    training, and a machine that gets busier (a CI runner, another job) makes the closing
    slower than every evaluation measured before it. A skipped part keeps what the model had
    (the recipe's map blur, no prompt match, no normal statistics) and says so in its record,
    so ``wall_time_s <= budget_s`` holds unless one part itself runs slower than the pace of
    those before it. Returns the blur, match and statistics records and what happened to the
    final evaluation.
    """
    pace, cfg = _ClosingPace(run.clock), tr.model.cfg

    def evaluate() -> str:
        run.evaluate()  # the end of the budget is a candidate whenever it fits
        return "done"

    # with nothing evaluated yet, the end of the budget is the only candidate: forced
    final = pace.part(
        1 + (run.average is not None), evaluate, lambda why: why, force=run.best_state is None
    )
    assert run.best_state is not None
    tr.model.load_state_dict(run.best_state)
    tr.calibration = run.best_calibration
    # on validation, like the fusion scale; then on held-out judge defects; inside the budget
    blur = pace.part(
        len(BLUR_SIGMAS),
        tr.choose_map_blur,
        lambda why: {"sigma": cfg.map_blur_sigma, "why": why},
    )
    match = pace.part(
        match_evaluations(), tr.choose_match, lambda why: {"weight": cfg.match_weight, "why": why}
    )
    if "tried" not in match and tr.cfg.normal_stats:  # the statistics start from its map
        why = f"skipped with the prompt match whose map it starts from ({match.get('why')})"
        return blur, match, {"weight": cfg.stats_weight, "why": why}, final
    # their map of the judge set (fitted before the first step)
    stats = pace.part(
        run.stats_evaluations, tr.choose_stats, lambda why: {"weight": cfg.stats_weight, "why": why}
    )
    return blur, match, stats, final


def fit_budget(tr: Trainer) -> Path:
    """Train ``tr`` within ``cfg.budget`` seconds; returns ``out_dir/final.pt`` (best proxy)."""
    from lineguard.train.trainer import LOSS_PARTS, _append_log, _cpu_seconds

    cfg, dev = tr.cfg, tr.device
    run = _Run(tr)
    clock = run.clock
    out_dir = Path(cfg.out_dir)
    loader, feats, images, step = tr._prepare()
    if tr.dist.main:  # the frozen backbone's statistics: the same fit now as after the last step
        with _all_cores(tr):
            tr.fit_stats()
    if tr.dist.world > 1:
        dist.barrier()
    clock.begin_training()  # loading and caching took their share of the budget already
    bar = tqdm(
        total=round(clock.budget_s),
        desc="train",
        unit="s",
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s {postfix}",
        disable=not (tr.progress and tr.dist.main),
    )
    stop = False
    while not stop:
        loader.sampler.set_epoch(run.epoch)
        tr.model.train()
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        sums = torch.zeros(len(LOSS_PARTS), device=dev)
        n, t_last = 0, time.perf_counter()
        for batch in loader:
            (stop,) = _agree(tr, clock.must_stop())
            if stop:
                break
            lr = cfg.lr * clock.factor()
            for group in tr.optimizer.param_groups:
                group["lr"] = lr
            sums += tr._step(step, batch, feats, images)
            if run.average is not None:
                run.average.update()
            n += 1
            run.steps += 1
            now = time.perf_counter()
            clock.record_step(now - t_last)
            t_last = now
            if n % 10 == 1:
                run.loss = sums[0].item() / n
                bar.n = min(round(clock.elapsed()), bar.total)
                bar.set_postfix_str(
                    f"left {clock.describe()} epoch {run.epoch + 1} loss {run.loss:.4f} "
                    f"lr {lr:.1e} proxy {run.best_proxy if run.curve else float('nan'):.3f}"
                )
            (due,) = _agree(tr, clock.eval_due())
            if due:
                run.loss = sums[0].item() / n
                if tr.dist.main:
                    with _all_cores(tr):
                        run.evaluate()
                if tr.dist.world > 1:
                    dist.barrier()
                tr.model.train()
                t_last = time.perf_counter()
        if n:
            tr.wall_time += time.perf_counter() - t0
            row = tr._history_row(
                run.epoch + 1,
                tr.optimizer.param_groups[0]["lr"],
                n,
                time.perf_counter() - t0,
                cpu0,
                sums,
            )
            run.loss = row["total"]
            if tr.dist.main:
                _append_log(out_dir / "train_log.jsonl", row)
        if n == 0 and not stop:
            stop = True  # an empty loader never advances the clock enough: do not spin
        run.epoch += 1
    reserve_s, closing_from = clock.reserve(), clock.elapsed()
    if tr.dist.main:
        with _all_cores(tr):
            blur, match, stats, final = _close(tr, run)
        tr.wall_time = clock.elapsed()
        tr.metrics = run.metrics()
        tr.metrics["wall_time_s"] = round(tr.wall_time, 2)
        # what was kept for the work after the last step, and what it took
        tr.metrics["closing"] = {
            "reserve_s": round(reserve_s, 2),
            "took_s": round(tr.wall_time - closing_from, 2),
            "final_evaluation": final,
        }
        tr.metrics["map_blur"] = blur
        tr.metrics["prompt_match"] = match
        tr.metrics["normal_stats"] = stats
        save_checkpoint(out_dir / "final.pt", tr.payload(run.best_point.get("epoch", 0)))
    bar.n = bar.total
    bar.close()
    if tr.dist.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir / "final.pt"
