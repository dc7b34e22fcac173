"""A pretrained timm encoder as a torchvision detection backbone: one map, or a feature pyramid."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.features import TimmFeatures, choose_taps

__all__ = ["TimmDetectionBackbone", "build_backbone"]


class TimmDetectionBackbone(nn.Module):
    """Normalised images ``[B, 3, H, W]`` → ``OrderedDict`` of maps, with ``out_channels`` as torchvision wants.

    Single-scale: ``{"0": [B, C, H/s, W/s]}`` at the deepest stride-≤16 tap (AlexNet: relu5, as in Fast R-CNN).
    Multi-scale: an FPN over the taps, ``{"0".."n-1", "pool"}`` all with ``fpn_channels`` channels.
    """

    def __init__(self, features: TimmFeatures, fpn_channels: int | None = None):
        super().__init__()
        self.body = features
        self.fpn = None
        if fpn_channels:
            self.fpn = FeaturePyramidNetwork(features.out_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
            self.out_channels = fpn_channels
        else:
            self.out_channels = features.out_channels[-1]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        if self.fpn is None:
            return OrderedDict([("0", maps[-1])])
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_backbone(ckpt: EncoderCheckpoint, fpn: bool | None = None, fpn_channels: int = 256) -> TimmDetectionBackbone:
    """The encoder of ``ckpt`` as a detection backbone.

    Args:
        ckpt: the pretrained encoder.
        fpn: multi-scale with an FPN; default: :func:`~transfer.common.features.default_fpn` (single scale for
            the paper's AlexNet, an FPN where the single-scale tap would drop learned layers, e.g. a ResNet).
        fpn_channels: FPN width.
    """
    model = ckpt.create_model()
    taps, use_fpn = choose_taps(model, fpn)
    features = TimmFeatures(model, taps)
    return TimmDetectionBackbone(features, fpn_channels if use_fpn else None)
