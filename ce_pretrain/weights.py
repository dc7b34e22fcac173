"""Strict state-dict loading: the one place that decides whether a checkpoint fits a model.

Silent partial loads are the classic transfer bug (a renamed key leaves a layer at its random init and nothing
says so), so every loader in ce-pretrain and ``transfer/`` goes through :func:`load_state_dict_strict`, which
names every missing, unexpected or mis-shaped tensor in one line.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["IncompatibleCheckpointError", "load_state_dict_strict", "state_dict_mismatch"]


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint's tensors do not match the model it is loaded into."""


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def state_dict_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        strict: bool = True) -> str | None:
    """What keeps ``state`` from loading into a module whose state dict is ``own``; ``None`` when it fits.

    Mis-shaped tensors always count; missing and unexpected keys only with ``strict``.
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not strict:
        missing = unexpected = []
    parts = [f"{len(missing)} missing ({_head(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_head(unexpected)})" if unexpected else "",
             f"{len(shapes)} of another shape ({_head(shapes)})" if shapes else ""]
    parts = [p for p in parts if p]
    return "; ".join(parts) if parts else None


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                           strict: bool = True) -> None:
    """Load ``state`` into ``module``, failing with one line unless every key and shape matches both ways.

    Args:
        module: the model to fill.
        state: tensors by state-dict key.
        what: how to name the checkpoint in the error, e.g. ``"checkpoint 'runs/x/model.safetensors'"``.
        strict: with ``False`` missing and unexpected keys are allowed, mis-shaped tensors still fail.

    Raises:
        IncompatibleCheckpointError: ``"<what> does not fit <model>: 2 missing (...); 1 unexpected (...)"``.
    """
    problem = state_dict_mismatch(module.state_dict(), state, strict=strict)
    if problem:
        raise IncompatibleCheckpointError(f"{what} does not fit {type(module).__name__}: {problem}")
    module.load_state_dict(dict(state), strict=strict)
