"""Shared by every transfer target: checkpoints, backbones, VOC data and VOC metrics."""

from .checkpoint import CheckpointError, EncoderCheckpoint, load_encoder
from .features import TimmFeatures, default_taps
from .voc import VOC_CLASSES, VOCClassification, VOCDetection, VOCLayoutError, VOCSegmentation, resolve_voc_dir

__all__ = [
    "VOC_CLASSES",
    "CheckpointError",
    "EncoderCheckpoint",
    "TimmFeatures",
    "VOCClassification",
    "VOCDetection",
    "VOCLayoutError",
    "VOCSegmentation",
    "default_taps",
    "load_encoder",
    "resolve_voc_dir",
]
