"""An exponential moving average of the trained weights: with ``ema_decay`` set, a second
candidate at every proxy evaluation of a budgeted run (off by default: on mtd it did not beat
the raw weights on the validation proxy, 0.7336 vs 0.7355; docs/benchmarks.md).

Why: a short budget ends while single steps still move the weights by noise (batch 4, 1.2 M
head parameters); the average over the last ~1/(1-decay) steps is a smoother model at no
training cost. Whether it is better is not assumed: the budgeted loop scores the raw and the
averaged weights on the same validation proxy and keeps whichever is best
(:mod:`lineguard.train.budget_fit`). Only trainable parameters are averaged: the backbone is
frozen and its BatchNorm statistics never change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model``'s trainable parameters with the usual early-step correction: the
    decay used at update ``t`` is ``min(decay, (1 + t) / (10 + t))``, so a run of a few dozen
    steps averages over what it has rather than over its random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call after each optimiser step)."""
        t = self.updates
        decay = min(self.decay, (1.0 + t) / (10.0 + t))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own ones after."""
        own = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for p, o in zip(self.params, own, strict=True):
                p.copy_(o)
