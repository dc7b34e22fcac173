"""Detection transfer on torchvision's Faster R-CNN: runs anywhere torch does (VOC2007, mAP@0.5)."""
