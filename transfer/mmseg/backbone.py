"""``CETimmBackbone``: any timm backbone in mmseg's ``MODELS`` registry, with our weights loaded strictly."""

from __future__ import annotations

import timm
import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS

import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)
from transfer.common.checkpoint import CheckpointError, load_strict
from transfer.common.features import TimmFeatures, last_tap

from .convert import BACKBONE_PREFIX

__all__ = ["CETimmBackbone"]


@MODELS.register_module()
class CETimmBackbone(BaseModule):
    """A timm model's feature maps at ``taps`` (default: its last stage; AlexNet: pool5, §5.2 "up to pool5").

    Args:
        model_name: timm architecture.
        checkpoint: a file written by :mod:`transfer.mmseg.convert`; loaded strictly in :meth:`init_weights`
            (mmengine's ``Pretrained`` init only warns about missing keys).
        taps: ``feature_info`` indices.
        init_cfg: mmengine init config (unused with ``checkpoint``).
    """

    def __init__(self, model_name: str, checkpoint: str | None = None, taps: list[int] | None = None,
                 init_cfg: dict | None = None):
        super().__init__(init_cfg)
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        self.body = TimmFeatures(model, taps or [last_tap(model)])
        self.out_channels = self.body.out_channels
        self.checkpoint = checkpoint

    def init_weights(self) -> None:
        if self.checkpoint is None:
            return super().init_weights()
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        unexpected = [k for k in state if not k.startswith(BACKBONE_PREFIX)]
        if unexpected:
            raise CheckpointError(f"{self.checkpoint} has keys outside the backbone: {unexpected[:4]}")
        load_strict(self.body.model, {k[len(BACKBONE_PREFIX):]: v for k, v in state.items()}, self.checkpoint)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: normalised images ``[B, 3, H, W]`` → one ``[B, C_i, h_i, w_i]`` map per tap."""
        return tuple(self.body(x))
