"""The whole training step captured once as a CUDA graph and replayed (``--cuda-graph``).

Issue 11 measured the GPU step as bound by the host: on an H100 the inpainting step took 13 ms at batch 64 and 14 ms
at batch 256, so nearly all of it was Python and kernel launches. A CUDA graph records every kernel of one step —
masks' loss weights, forward, losses, backward, the non-finite check, both optimisers — and replays them with one
launch, so the host cost no longer grows with the number of kernels. This is PyTorch's "whole network capture"
(``torch.cuda.graph``): the step must have static shapes and addresses and never wait for the host, which
:meth:`ContextEncoderObjective.step <ce_pretrain.objective.ContextEncoderObjective.step>` already guarantees (fused
Adam skips a non-finite step on the device; nothing calls ``.item()``).

What the capture needs, and where it is arranged:

* a few eager steps first, on a side stream (cuDNN picks its kernels, the optimisers create their state, the
  allocator warms up): :class:`GraphedStep`, ``warmup_steps``;
* optimisers that may be captured, with learning rates held in device tensors so that the schedule, which
  rewrites them in place between replays, reaches the graph: :func:`make_capturable` when the :class:`GraphedStep`
  is made, after a resume restored the optimisers (whose state tensors the graph then reads); an eager run resumed
  from such a checkpoint turns the rates back to floats (:func:`plain_rates`);
* autocast without its weight-cast cache (cast copies made during capture would be reused stale):
  ``AutocastKwargs(cache_enabled=False)`` in :func:`ce_pretrain.engine.make_accelerator`;
* one process, no gradient accumulation, no fp16 loss scaling: refused by :func:`ce_pretrain.config.validate`
  and :func:`check_supported`.

Dropout stays random: the default CUDA generator is captured with its seed and offset read at each replay, so
seeding it before a replay (the engine does, every step) works as it does eagerly.
"""

from __future__ import annotations

import torch

__all__ = ["GraphedStep", "check_supported", "make_capturable", "plain_rates"]


def check_supported(accelerator) -> str | None:
    """Why this run's accelerator cannot capture its step (one line), or ``None`` when it can. The flags that
    cannot combine with ``--cuda-graph`` (``--compile``, gradient accumulation, fp16) are refused earlier, by
    :func:`ce_pretrain.config.validate`; what only the launch decides is checked here."""
    if accelerator.device.type != "cuda":
        return f"--cuda-graph needs a CUDA GPU; this run is on {accelerator.device.type}"
    if accelerator.num_processes > 1:
        return (f"--cuda-graph captures one process's step; this run has {accelerator.num_processes} processes "
                "(drop --cuda-graph, or run on one GPU)")
    return None


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Let ``optimizer`` (the run's fused Adam, plain or accelerate-wrapped) run inside a CUDA graph: ``capturable``
    on, every group's learning rate a 0-dim float32 tensor on ``device`` (rewritten in place by
    :meth:`~ce_pretrain.objective.ContextEncoderObjective.scale_lr`). Its results are those of the float rate.
    Fused Adam already keeps its step counts beside the parameters, also when loaded from a checkpoint."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def plain_rates(optimizer: torch.optim.Optimizer) -> None:
    """Learning rates back to floats: an eager run resumed from a ``--cuda-graph`` checkpoint (whose optimiser state
    holds them as tensors, loaded onto the CPU) must not hand a CPU tensor to a GPU optimiser."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])


class GraphedStep:
    """``objective.step`` run eagerly ``warmup_steps`` times, then captured once and replayed.

    Each call copies its images and masks into the graph's static inputs and replays; it returns the graph's
    static ``(loss, logs)`` tensors, which the next call overwrites (read them before, as the engine does).

    Args:
        objective: the run's :class:`~ce_pretrain.objective.ContextEncoderObjective`, on a CUDA device.
        warmup_steps: eager steps before the capture (real training steps, on a side stream).
    """

    def __init__(self, objective, warmup_steps: int = 3):
        self.objective, self.warmup_steps = objective, warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs = None
        # capturable from the first (eager) step on: the capture then records the optimisers exactly as they ran,
        # and rates restored from a checkpoint (tensors on the CPU) move to the device
        for opt in objective.optimizers:
            make_capturable(opt, objective.accelerator.device)
        objective.scale_lr(objective.lr_factor)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, images: torch.Tensor, mask: torch.Tensor):
        self.steps += 1
        if self.graph is not None:
            if images.shape != self._inputs[0].shape or mask.shape != self._inputs[1].shape:
                raise ValueError(f"a CUDA graph replays one shape: captured images {list(self._inputs[0].shape)}, "
                                 f"now {list(images.shape)} (use a sampler that drops the last partial batch)")
            self._inputs[0].copy_(images, non_blocking=True)
            self._inputs[1].copy_(mask, non_blocking=True)
            self.graph.replay()
            return self._outputs
        if self.steps <= self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.objective.step(images, mask)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture(images, mask)

    def _capture(self, images: torch.Tensor, mask: torch.Tensor):
        self._inputs = (images.clone(), mask.clone())  # clone keeps the memory format (channels-last)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the loader's pin-memory thread may call the CUDA API while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._outputs = self.objective.step(*self._inputs)
        self.graph = graph
        graph.replay()  # capturing recorded the step without running it
        return self._outputs
