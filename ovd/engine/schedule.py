"""Learning-rate schedule: linear warm-up then multi-step decay (detectron2's WarmupMultiStepLR)."""

from __future__ import annotations

from bisect import bisect_right


def lr_factor(iteration: int, *, warmup_iters: int, warmup_factor: float, steps: list[int], gamma: float) -> float:
    """Multiplier of the base LR at ``iteration`` (0-based).

    Warm-up goes linearly from ``warmup_factor`` at 0 to 1 at ``warmup_iters``; the LR is then
    multiplied by ``gamma`` at every milestone in ``steps`` passed.
    """
    factor = gamma ** bisect_right(sorted(steps), iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor
