"""torchvision FCN over a pretrained timm encoder, taking [0, 1] RGB images and normalising them itself."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.segmentation.fcn import FCN, FCNHead

from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.features import TimmFeatures

__all__ = ["TASK", "FCNSegmenter", "build_fcn", "load_segmenter"]

TASK = "torchvision-fcn"


class _OutBackbone(nn.Module):
    """``TimmFeatures`` → ``{"out": [B, C, h, w]}``, the dict torchvision's FCN reads."""

    def __init__(self, features: TimmFeatures):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(out=self.features(x)[-1])


class FCNSegmenter(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] → logits ``[B, num_classes, H, W]``.

    The encoder's last feature map (AlexNet: pool5, §5.2 "up to pool5") feeds torchvision's FCN head (a fresh
    3×3 convolution, dropout and a 1×1 classifier, standing in for the convolutionalised fc6-fc8), upsampled
    bilinearly to the input size.
    """

    def __init__(self, ckpt: EncoderCheckpoint, num_classes: int = 21):
        super().__init__()
        model = ckpt.create_model()
        features = TimmFeatures(model, [len(model.feature_info) - 1])
        self.fcn = FCN(_OutBackbone(features), FCNHead(features.out_channels[0], num_classes))
        self.register_buffer("mean", torch.tensor(ckpt.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ckpt.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fcn((images - self.mean) / self.std)["out"]


def build_fcn(ckpt: EncoderCheckpoint, num_classes: int = 21) -> FCNSegmenter:
    return FCNSegmenter(ckpt, num_classes)


def load_segmenter(folder) -> FCNSegmenter:
    """The segmenter a ``transfer.torchvision_seg.train --save-model`` run kept in ``OUTPUT_DIR/model``, rebuilt and
    loaded strictly, in eval mode: ``model(images)`` (RGB in [0, 1], ``[B, 3, H, W]``) gives ``[B, classes, H, W]``
    logits, class 0 the background and the others ``config["label_names"]``."""
    from transfer.common.checkpoint import load_strict, load_trained

    config, skeleton, weights = load_trained(folder, TASK)
    model = build_fcn(skeleton, **config["build"])
    load_strict(model, weights, f"segmenter from {str(folder)!r}")
    return model.eval()
