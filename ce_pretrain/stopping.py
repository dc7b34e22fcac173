"""Ending a run early and cleanly: SIGINT / SIGTERM and a time budget, agreed by every process.

One home for pretraining (:mod:`ce_pretrain.engine`), the transfer engine (:mod:`transfer.common.engine`) and the
detectron2 / mmseg adapters, which read the same request from their own trainers' hooks:

    with StopRequest(max_time=1200) as stop:
        for step in ...:
            ...
            if code := agreed(stop, device, sync=step % 10 == 0):
                save a checkpoint; exit with exit_status(code)

A stop *code* is 0 (go on), 1 (``--max-time`` ran out) or 128 + N (signal N); across processes the largest wins.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator

import torch

__all__ = ["DUPLICATE_WINDOW_S", "PARENT_ENV", "StopRequest", "agreed", "describe", "exit_status",
           "forward_signals_to_children"]

# a second signal this soon after the first is a copy of it, not a second request: launchers (torchrun, detectron2's
# parent process, Slurm) forward or convert a signal that the terminal or the scheduler already sent every process
DUPLICATE_WINDOW_S = 2.0
# set by a parent that starts runs as child processes (the feature study) to its pid: the child is then stopped
# (SIGTERM: it saves a checkpoint) when that parent dies, even by kill -9, instead of training on as an orphan
PARENT_ENV = "CE_PRETRAIN_STOP_WITH_PARENT"


class StopRequest:
    """SIGINT / SIGTERM and a time budget, turned into a stop at the end of the current step.

    The first signal only sets :attr:`signal`; the loop finishes its step, saves a checkpoint and what it has made
    so far, and exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM). A second signal (more than
    :data:`DUPLICATE_WINDOW_S` later) exits at once: every file is written to a temporary name and renamed, so at
    worst a temporary file is left, never a damaged one.

    Use as a context manager around the run; handlers are restored on exit. Outside the main thread (where Python
    cannot install handlers) only the time budget applies.

    Args:
        max_time: seconds the run may take, or None.
        start: when the budget started (``time.monotonic()``); default: now.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, max_time: float | None = None, start: float | None = None):
        self.max_time, self.start = max_time, time.monotonic() if start is None else start
        self.signal: int | None = None
        self._when = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        if self._previous:
            _stop_with_parent(self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        # os.write, not print: a handler may run while print holds stderr's lock
        if self.signal is not None:
            if time.monotonic() - self._when < DUPLICATE_WINDOW_S:
                return
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now, without saving\n".encode())
            os._exit(128 + signum)
        self.signal, self._when = signum, time.monotonic()
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint (send it "
                    f"again to exit at once)\n".encode())

    @property
    def out_of_time(self) -> bool:
        return self.max_time is not None and time.monotonic() - self.start >= self.max_time

    def code(self) -> int:
        """This process's wish: 0 = go on, 1 = time is up, 128 + N = signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return 1 if self.out_of_time else 0


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agreed(stop: StopRequest | None, device: torch.device | str = "cpu", sync: bool = True) -> int:
    """The stop code every process acts on after this step (the largest wish of any).

    One process reads its own flags every step (no device work). Several compare through an all-reduce (max) only
    where ``sync`` is true — callers pass the same ``sync`` on every rank (e.g. every 10th step), so all of them stop
    after the same step and the collective cannot deadlock — and go on elsewhere.
    """
    if stop is None:
        return 0
    if _world() == 1:
        return stop.code()
    if not sync:
        return 0
    wish = torch.tensor([stop.code()], device=device)
    torch.distributed.all_reduce(wish, op=torch.distributed.ReduceOp.MAX)
    code = int(wish.item())
    if code > 1 and stop.signal is None:  # another rank was signalled: exit with its status here too
        stop.signal = code - 128
    return code


def describe(code: int) -> str | None:
    """``"--max-time"``, ``"SIGTERM"``, ... for a stop code; None for 0."""
    if code == 0:
        return None
    return "--max-time" if code == 1 else signal.Signals(code - 128).name


def exit_status(code: int) -> int:
    """The process's exit status for a stop code: 0 for a finished run or a spent ``--max-time`` (the budget was
    asked for), 128 + N for signal N."""
    return code if code > 1 else 0


@contextlib.contextmanager
def forward_signals_to_children() -> Iterator[None]:
    """In a parent that only waits for its worker processes (detectron2's ``launch``): pass SIGINT / SIGTERM on to
    every child instead of dying and orphaning them; each child then stops cleanly (its :class:`StopRequest` takes a
    copy arriving with the terminal's own Ctrl-C as one request)."""
    def forward(signum: int, _frame) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {}
    try:
        for sig in StopRequest.SIGNALS:
            with contextlib.suppress(ValueError):
                previous[sig] = signal.signal(sig, forward)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_with_parent(handle) -> None:
    """If the parent that started this process set :data:`PARENT_ENV`, have the kernel send SIGTERM when it dies
    (Linux's ``PR_SET_PDEATHSIG``), and act on that at once if it is already gone. The variable is consumed, so
    this process's own children do not inherit it. Elsewhere a parent's death leaves the run going, as before."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM)) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError, ValueError):
        return
    if str(os.getppid()) != parent:  # it died before the request above was in place
        handle(signal.SIGTERM, None)
