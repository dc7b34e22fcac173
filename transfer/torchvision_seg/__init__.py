"""Segmentation transfer on torchvision's FCN: runs anywhere torch does (VOC2012 + SBD, mIoU)."""

from .model import build_fcn, load_segmenter

__all__ = ["build_fcn", "load_segmenter"]
