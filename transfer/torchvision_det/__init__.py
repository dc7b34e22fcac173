"""Detection transfer on torchvision's Faster R-CNN: runs anywhere torch does (VOC2007, mAP@0.5)."""

from .model import build_faster_rcnn, load_detector

__all__ = ["build_faster_rcnn", "load_detector"]
