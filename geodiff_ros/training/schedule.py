"""Learning-rate schedule of E2E fine-tuning (Marigold's IterExponential, docs/method.md#lr-schedule)."""

from __future__ import annotations

import math

__all__ = ["IterExponential"]


class IterExponential:
    """LR factor per optimiser step ``n``: linear warm-up 0->1, then exponential decay.

    ``n < warmup``: ``n / warmup``; ``warmup <= n < total``:
    ``exp(((n - warmup) / (total - warmup)) * ln(final_ratio))``; ``n >= total``: ``final_ratio``.
    Defaults of the paper: warmup 100, total 20 000, final_ratio 0.01.

    The paper's code multiplies the lengths by num_processes because accelerate steps a prepared
    scheduler once per process; our trainer steps the schedule itself once per optimiser step,
    so the lengths here are plain optimiser steps on any number of GPUs.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 100, final_ratio: float = 0.01) -> None:
        if total_steps <= warmup_steps:
            msg = f"`total_steps` ({total_steps}) must exceed `warmup_steps` ({warmup_steps})."
            raise ValueError(msg)
        if not 0.0 < final_ratio <= 1.0:
            msg = f"`final_ratio` must be in (0, 1]; got {final_ratio}"
            raise ValueError(msg)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.final_ratio = final_ratio

    def __call__(self, n: int) -> float:
        if self.warmup_steps > 0 and n < self.warmup_steps:
            return n / self.warmup_steps
        if n < self.total_steps:
            frac = (n - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            return math.exp(frac * math.log(self.final_ratio))
        return self.final_ratio
