"""Segmentation transfer on torchvision's FCN: runs anywhere torch does (VOC2012 + SBD, mIoU)."""
