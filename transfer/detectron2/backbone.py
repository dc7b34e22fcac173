"""Any timm backbone in detectron2's ``BACKBONE_REGISTRY``, wrapped the way the context encoder trained it.

``build_timm_backbone``: one feature map, the single-scale tap of :mod:`transfer.common.features` (the deepest at
stride ≤ 16: AlexNet's relu5 for the paper's Fast R-CNN, a ResNet's C4), named ``s<stride>``.
``build_timm_fpn_backbone``: detectron2's FPN over the last tap of each stride (``p2``-``p6``). Both read
``MODEL.TIMM.NAME`` and optionally ``MODEL.TIMM.TAPS`` (``feature_info`` indices); the weights come from
``MODEL.WEIGHTS`` written by :mod:`transfer.detectron2.convert`.
"""

from __future__ import annotations

import timm
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)
from transfer.common.features import TimmFeatures, default_taps

__all__ = ["TimmBackbone", "add_timm_config", "build_timm_backbone", "build_timm_fpn_backbone"]


def add_timm_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.TIMM.{NAME, TAPS}`` to a detectron2 config (in place)."""
    cfg.MODEL.TIMM = CfgNode()
    cfg.MODEL.TIMM.NAME = "alexnet"
    cfg.MODEL.TIMM.TAPS = []
    return cfg


class TimmBackbone(Backbone):
    """A timm model's feature maps at ``taps`` as detectron2 features ``{"s<stride>": [B, C, H/s, W/s]}``.

    Its weights are the timm model's own, under ``body.model.`` (see :mod:`transfer.detectron2.keys`).

    Args:
        name: timm architecture.
        taps: ``feature_info`` indices, one per stride; default per :func:`~transfer.common.features.default_taps`.
        multi_scale: the default taps are those for an FPN.
    """

    def __init__(self, name: str, taps: list[int] | None = None, multi_scale: bool = False):
        super().__init__()
        model = timm.create_model(name, pretrained=False, num_classes=0)
        self.body = TimmFeatures(model, taps or default_taps(model, multi_scale))
        if len(set(self.body.strides)) != len(self.body.strides):
            raise ValueError(f"taps {self.body.taps} of {name!r} repeat a stride {self.body.strides}; take one per "
                             "stride")
        self._out_features = [f"s{s}" for s in self.body.strides]
        self._out_feature_channels = dict(zip(self._out_features, self.body.out_channels))
        self._out_feature_strides = dict(zip(self._out_features, self.body.strides))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: normalised images ``[B, 3, H, W]`` → ``{"s<stride>": [B, C, H / stride, W / stride]}``."""
        return dict(zip(self._out_features, self.body(x)))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TimmBackbone:
    """Single-scale timm backbone (the paper's setting for AlexNet)."""
    return TimmBackbone(cfg.MODEL.TIMM.NAME, list(cfg.MODEL.TIMM.TAPS) or None, multi_scale=False)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """timm backbone at up to four strides under detectron2's FPN (``p2``-``p6`` for a stride-4-to-32 model)."""
    bottom_up = TimmBackbone(cfg.MODEL.TIMM.NAME, list(cfg.MODEL.TIMM.TAPS) or None, multi_scale=True)
    return FPN(bottom_up=bottom_up, in_features=bottom_up._out_features, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
