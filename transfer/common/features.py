"""Feature maps of any timm model at chosen taps, for detection and segmentation heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TimmFeatures", "default_taps"]


def default_taps(model: nn.Module, multi_scale: bool) -> list[int]:
    """Which ``feature_info`` taps to take.

    Single-scale: AlexNet's relu5 (conv5 at stride 16, as Fast R-CNN uses it, §5.2), else the last tap.
    Multi-scale (for an FPN): the last tap of each stride from 4 on, at most the four deepest.
    """
    info = list(model.feature_info)
    if not multi_scale:
        for i, tap in enumerate(info):
            if tap["module"] == "features.13" and type(model).__name__ == "AlexNet":
                return [i]
        return [len(info) - 1]
    last_of_stride: dict[int, int] = {}
    for i, tap in enumerate(info):
        if tap["reduction"] >= 4:
            last_of_stride[tap["reduction"]] = i
    return sorted(last_of_stride.values())[-4:]


class TimmFeatures(nn.Module):
    """A timm model cut after its deepest requested tap, returning the maps at the taps.

    Uses timm's public ``forward_intermediates`` / ``prune_intermediate_layers`` contract, so the state-dict keys
    stay timm's own (``model.<timm key>``).

    Args:
        model: a timm model whose weights are already loaded.
        taps: ``feature_info`` indices to return, shallow to deep.
    """

    def __init__(self, model: nn.Module, taps: Sequence[int]):
        super().__init__()
        self.taps = list(taps)
        info = list(model.feature_info)
        self.out_channels = [info[i]["num_chs"] for i in self.taps]
        self.strides = [info[i]["reduction"] for i in self.taps]
        model.prune_intermediate_layers(indices=self.taps, prune_norm=True, prune_head=True)
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: normalised images ``[B, 3, H, W]`` → one ``[B, C_i, H / s_i, W / s_i]`` map per tap."""
        return self.model.forward_intermediates(x, indices=self.taps, intermediates_only=True, output_fmt="NCHW")
