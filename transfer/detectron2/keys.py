"""Where the timm encoder's tensors live in a detectron2 model built from our configs."""

from __future__ import annotations

import torch

from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.features import TimmFeatures, default_taps

__all__ = ["BACKBONE_PREFIX", "FPN_BACKBONE_PREFIX", "detectron2_state_dict"]

# TimmBackbone keeps TimmFeatures as ``body``, which keeps the timm model as ``model``: timm keys stay verbatim
BACKBONE_PREFIX = "backbone.body.model."
FPN_BACKBONE_PREFIX = "backbone.bottom_up.body.model."


def detectron2_state_dict(ckpt: EncoderCheckpoint, fpn: bool) -> dict[str, torch.Tensor]:
    """The encoder's tensors under detectron2 model keys: those the backbone, pruned after its deepest tap, holds.

    Args:
        ckpt: the pretrained encoder (full timm state dict).
        fpn: the backbone is wrapped in an FPN (``build_timm_fpn_backbone``).
    """
    model = ckpt.create_model()
    keep = set(TimmFeatures(model, default_taps(model, fpn)).model.state_dict())
    prefix = FPN_BACKBONE_PREFIX if fpn else BACKBONE_PREFIX
    return {prefix + k: v for k, v in ckpt.state_dict.items() if k in keep}
