"""Shared by every transfer target: checkpoints, backbone taps, the flag vocabulary, the fine-tuning engine, VOC
data and VOC metrics."""

from .checkpoint import CheckpointError, EncoderCheckpoint, check_source, load_encoder
from .cli import RunInterrupted, UsageError, add_common_args, check_output_dir, claim_output_dir, run_main
from .engine import EngineConfig, Task, fit
from .features import TimmFeatures, choose_taps, default_taps
from .voc import VOC_CLASSES, VOCClassification, VOCDetection, VOCLayoutError, VOCSegmentation, resolve_voc_dir

__all__ = [
    "VOC_CLASSES",
    "CheckpointError",
    "EncoderCheckpoint",
    "EngineConfig",
    "RunInterrupted",
    "Task",
    "TimmFeatures",
    "UsageError",
    "VOCClassification",
    "VOCDetection",
    "VOCLayoutError",
    "VOCSegmentation",
    "add_common_args",
    "check_source",
    "check_output_dir",
    "claim_output_dir",
    "choose_taps",
    "default_taps",
    "fit",
    "load_encoder",
    "resolve_voc_dir",
    "run_main",
]
