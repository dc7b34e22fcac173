"""Where to tap a timm backbone, and its feature maps at those taps, for detection and segmentation heads.

One rule, read from timm's ``feature_info`` (never from class or module names), decides the taps every target
uses (torchvision Faster R-CNN, detectron2, mmseg):

* **Single scale**: the deepest tap whose stride is at most 16 (:data:`SINGLE_SCALE_MAX_STRIDE`). That is
  AlexNet's relu5 (conv5, stride 16), the map Fast R-CNN pools its RoIs from (§5.2), VGG's conv5_3, and a
  ResNet's C4 (``layer3``), the map of detectron2's C4 models. A stride-16 map keeps small objects a few cells
  wide, where the stride-32 map would not.
* **Pyramid** (for an FPN): the last tap of each stride from 4 on, at most the four deepest.
* **FPN or not, by default**: an FPN when the single-scale tap would throw away learned layers of the encoder
  (a ResNet's ``layer4``, a ConvNeXt's last stage, the learned pool5 convolution of the pool-free AlexNet),
  because the pyramid then uses every pretrained weight; single scale when only parameter-free layers lie past
  it (AlexNet's and VGG's pool5, a ViT whose blocks all run at stride 16), so the paper's single-scale Fast
  R-CNN setting loses nothing of the pretraining.

    taps, fpn = choose_taps(model)          # the default
    taps, fpn = choose_taps(model, fpn=True)  # forced
    features = TimmFeatures(model, taps)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "SINGLE_SCALE_MAX_STRIDE",
    "TimmFeatures",
    "choose_taps",
    "default_fpn",
    "default_taps",
    "last_tap",
    "pyramid_taps",
    "single_scale_tap",
]

SINGLE_SCALE_MAX_STRIDE = 16
PYRAMID_MIN_STRIDE = 4
PYRAMID_MAX_LEVELS = 4


def single_scale_tap(feature_info: Iterable[Mapping]) -> int:
    """Index of the deepest tap at stride ≤ :data:`SINGLE_SCALE_MAX_STRIDE` (the shallowest tap if none is)."""
    info = list(feature_info)
    fine = [i for i, tap in enumerate(info) if tap["reduction"] <= SINGLE_SCALE_MAX_STRIDE]
    return fine[-1] if fine else 0


def pyramid_taps(feature_info: Iterable[Mapping]) -> list[int]:
    """Indices of the last tap of each stride ≥ 4, at most the four deepest, shallow to deep."""
    last_of_stride: dict[int, int] = {}
    for i, tap in enumerate(feature_info):
        if tap["reduction"] >= PYRAMID_MIN_STRIDE:
            last_of_stride[tap["reduction"]] = i
    return sorted(last_of_stride.values())[-PYRAMID_MAX_LEVELS:]


def last_tap(model: nn.Module) -> int:
    """Index of the deepest tap (AlexNet: pool5, the paper's "encoder up to pool5" for classification and FCN)."""
    return len(model.feature_info) - 1


def _trunk_parameters(model: nn.Module, tap: int) -> int:
    """Parameters left in ``model`` once cut after ``tap`` (head removed, final norm kept)."""
    # clone with every parameter and buffer on the meta device: pruning a copy costs no memory and no copy of data
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    clone = copy.deepcopy(model, memo)
    clone.prune_intermediate_layers(indices=[tap], prune_norm=False, prune_head=True)
    return sum(p.numel() for p in clone.parameters())


def default_fpn(model: nn.Module) -> bool:
    """Whether a detector should use an FPN by default: the single-scale tap would drop learned layers."""
    return _trunk_parameters(model, single_scale_tap(model.feature_info)) < _trunk_parameters(model, last_tap(model))


def default_taps(model: nn.Module, multi_scale: bool) -> list[int]:
    """The taps of the rule above: :func:`pyramid_taps` for an FPN, else ``[single_scale_tap]``."""
    return pyramid_taps(model.feature_info) if multi_scale else [single_scale_tap(model.feature_info)]


def choose_taps(model: nn.Module, fpn: bool | None = None) -> tuple[list[int], bool]:
    """Taps and FPN choice for a detection backbone.

    Args:
        model: a timm model (``feature_info``, ``prune_intermediate_layers``).
        fpn: force multi-scale (True) or single scale (False); None applies :func:`default_fpn`.

    Returns:
        ``(taps, fpn)``: ``feature_info`` indices, shallow to deep, and whether they feed an FPN.
    """
    use_fpn = default_fpn(model) if fpn is None else fpn
    return default_taps(model, use_fpn), use_fpn


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
