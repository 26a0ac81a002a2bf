"""Wall-clock training budgets: parse "30m", and a schedule that fits the budget.

Why time and not epochs: a plant engineer has "half an hour on this PC", not "N epochs", and the
same recipe must finish on a 2-core CPU and on a GPU. The learning rate follows the fraction of
the budget spent, not the step count: linear warm-up over the first ``warmup_fraction``, then a
cosine decay to ``min_lr_fraction`` of the peak exactly when training ends. Training ends before
the budget does, by a reserve for the closing evaluations (the final proxy and the choices made
on validation after the last step): the schedule and the evaluation points are fractions of the
training span, from the first step (reading and caching the images come before it) to that
horizon (budget minus reserve), so the lr reaches its floor at the last step even when the
closing work is a large share of a short budget. The reserve uses the slowest step and the
slowest evaluation seen so far as estimates.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$", re.IGNORECASE)


def parse_budget(value: str | int | float) -> float:
    """``"30m"`` / ``"1.5h"`` / ``"90s"`` / ``"1800"`` / ``1800`` -> seconds (> 0)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _BUDGET.match(str(value))
        if match is None:
            raise ValueError(f"budget {value!r}: expected seconds or a number with s, m or h")
        seconds = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"budget {value!r}: must be a positive, finite duration")
    return seconds


def lr_factor(fraction: float, warmup_fraction: float, min_lr_fraction: float) -> float:
    """Multiplier of the peak lr after ``fraction`` (0..1) of the budget: warm-up, cosine."""
    f = min(max(fraction, 0.0), 1.0)
    if warmup_fraction > 0 and f < warmup_fraction:
        return max(f / warmup_fraction, 0.01)
    span = max(1.0 - warmup_fraction, 1e-9)
    cos = 0.5 * (1.0 + math.cos(math.pi * min((f - warmup_fraction) / span, 1.0)))
    return min_lr_fraction + (1.0 - min_lr_fraction) * cos


#: Spare on the closing work's estimate (in proxy evaluations). 1.2 was not enough: a 192-px mtd
#: run's closing choices took 95 s after its last evaluation and it ended 1.2 s over its
#: 1800 s budget (the 192-px candidate before it: 61 s), so the estimate gets 50 % to spare.
CLOSING_SPARE = 1.5


@dataclass
class BudgetClock:
    """Time left, the lr factor and when to evaluate, for one budgeted run.

    ``evals`` proxy evaluations are spread evenly over the training span, from the first step to
    the horizon (plus one at the end); the first one after 25 % of it, since an earlier model is
    never the one worth keeping.
    """

    budget_s: float
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.02
    evals: int = 8
    closing_evals: int = 1  # evaluations after the last step (final proxy, choices on validation)
    start: float = field(default_factory=time.perf_counter)
    max_step_s: float = 0.0
    max_eval_s: float = 0.0
    train_from: float = 0.0  # elapsed seconds at the first step (data loading comes before)
    _next_eval: int = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reserve(self) -> float:
        """Seconds kept for one more step and the closing evaluations, with ``CLOSING_SPARE``."""
        return 1.5 * self.max_step_s + CLOSING_SPARE * self.closing_evals * self.max_eval_s

    def horizon(self) -> float:
        """Seconds of training: the budget less the reserve (never below a tenth of it)."""
        return max(self.budget_s - self.reserve(), 0.1 * self.budget_s)

    def begin_training(self) -> None:
        """Mark the first step: the schedule spans the steps, not the data loading before."""
        self.train_from = self.elapsed()

    def fraction(self) -> float:
        """Share of the training span (first step to horizon) spent: the lr schedule and the
        evaluations follow it."""
        span = self.horizon() - self.train_from
        return (self.elapsed() - self.train_from) / span if span > 0 else math.inf

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def factor(self) -> float:
        return lr_factor(self.fraction(), self.warmup_fraction, self.min_lr_fraction)

    def record_step(self, seconds: float) -> None:
        self.max_step_s = max(self.max_step_s, seconds)

    def record_eval(self, seconds: float) -> None:
        self.max_eval_s = max(self.max_eval_s, seconds)

    def _eval_times(self) -> list[float]:
        first = 0.25
        n = max(self.evals, 1)
        return [first + (1.0 - first) * i / n for i in range(n)]

    def eval_due(self) -> bool:
        """True once per scheduled point (fractions of the span), never in the last step."""
        times = self._eval_times()
        if self._next_eval < len(times) and self.fraction() >= times[self._next_eval]:
            while self._next_eval < len(times) and self.fraction() >= times[self._next_eval]:
                self._next_eval += 1
            return True
        return False

    def must_stop(self) -> bool:
        """Stop when one more step and the closing evaluations would not fit in the budget."""
        return self.left() <= self.reserve()

    def describe(self) -> str:
        left = max(self.left(), 0.0)
        return f"{int(left // 60)}:{int(left % 60):02d}"
