"""Cosine learning-rate schedule with linear warmup and a floor."""
from __future__ import annotations

import math

import torch


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    return max(1, math.ceil(warmup_frac * total_steps)) if warmup_frac > 0 else 0


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup           # reaches the peak on the last warmup step
    decay = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_frac: float,
                   min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(total_steps, warmup_frac)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warm, min_ratio))
