"""torchvision Faster R-CNN over a pretrained timm encoder, with the encoder's own preprocessing."""

from __future__ import annotations

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from transfer.common.checkpoint import EncoderCheckpoint

from .backbone import build_backbone

__all__ = ["TASK", "build_faster_rcnn", "load_detector"]

TASK = "torchvision-faster-rcnn"


def build_faster_rcnn(ckpt: EncoderCheckpoint, num_classes: int = 21, fpn: bool | None = None,
                      min_size: int = 600, max_size: int = 1000, **kwargs) -> FasterRCNN:
    """Faster R-CNN whose backbone is the encoder; RPN, RoI heads and box predictor freshly initialised (§5.2).

    Images go in as RGB in [0, 1] and are normalised with the encoder's pretraining mean and std.

    Args:
        ckpt: the pretrained encoder.
        num_classes: classes including background (VOC: 21).
        fpn: see :func:`~transfer.torchvision_det.backbone.build_backbone`.
        min_size: shorter side of the resized input (Fast R-CNN: 600).
        max_size: cap on the longer side (Fast R-CNN: 1000).
        kwargs: more ``FasterRCNN`` arguments.
    """
    backbone = build_backbone(ckpt, fpn)
    if backbone.fpn is None:
        # one stride-16 map: Faster R-CNN's 15 anchors per location, RoI pooling to 6×6 as AlexNet's pool5
        kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)))
        kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(["0"], output_size=6, sampling_ratio=2))
    return FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                      image_mean=list(ckpt.mean), image_std=list(ckpt.std), **kwargs)


def load_detector(folder) -> FasterRCNN:
    """The detector a ``transfer.torchvision_det.train --save-model`` run kept in ``OUTPUT_DIR/model``, rebuilt and
    loaded strictly, in eval mode: ``model([image])`` (RGB in [0, 1], ``[3, H, W]``) gives boxes, labels (1–20:
    ``config["label_names"]``, 0 is the background) and scores."""
    from transfer.common.checkpoint import load_strict, load_trained

    config, skeleton, weights = load_trained(folder, TASK)
    model = build_faster_rcnn(skeleton, **config["build"])
    load_strict(model, weights, f"detector from {str(folder)!r}")
    return model.eval()
