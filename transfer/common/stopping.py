"""Ending a run early and cleanly: SIGINT / SIGTERM and the ``--max-time`` budget, agreed by every process."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import torch

__all__ = ["StopFlag", "should_stop"]


class StopFlag:
    """SIGINT / SIGTERM set a flag the loop reads after each step; a second signal exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # files are written atomically: leaving mid-write corrupts nothing
            print(f"\n{signal.Signals(signum).name} again: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (again to exit "
              "now)", file=sys.stderr, flush=True)


def should_stop(stop: StopFlag, started: float, max_time: float | None, accelerator, sync: bool) -> str | None:
    """Why to stop after this step, agreed by every process (they compare only at ``sync`` steps)."""
    if not sync:
        return None
    local = 0
    if stop.signum is not None:
        local = stop.signum
    elif max_time is not None and time.monotonic() - started >= max_time:
        local = -1
    if accelerator.num_processes > 1:
        local = int(accelerator.reduce(torch.tensor([local], device=accelerator.device), "max").item())
    if local > 0:
        stop.signum = stop.signum or local
        return f"stopped by {signal.Signals(local).name}"
    return "stopped at --max-time" if local < 0 else None
