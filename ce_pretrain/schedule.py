"""Learning-rate schedules (``--lr-schedule``, ``--warmup-steps``): linear warm-up, then constant or cosine to 0.

The multiplier of optimizer step ``t`` is a pure function of ``t``, like the masks' seeds
(:func:`ce_pretrain.objective.step_seed`): the checkpoint's step count is the schedule's whole state, so a resumed
run continues it exactly without a scheduler object to save (accelerate would pickle it beside the weights).
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of a ``total_steps`` schedule.

    Warm-up: ``(step + 1) / warmup_steps``, so the first step already moves (at ``lr / warmup_steps``) and step
    ``warmup_steps − 1`` reaches the full rate. Then ``constant``: 1; ``cosine``: ``½(1 + cos(π·p))`` with ``p`` the
    fraction of the post-warm-up steps done, which is 0 at ``total_steps`` and stays 0 after it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
