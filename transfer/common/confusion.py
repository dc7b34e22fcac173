"""Semantic-segmentation confusion matrix and the per-class IoU over it (VOC's mIoU is their NaN-mean)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates ``[K, K]`` counts (rows ground truth, columns prediction), ignoring ``ignore_index`` pixels.

    Args:
        num_classes: K (21 for VOC: background + 20).
        ignore_index: the void label (255 in VOC).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer label maps of one shape (``[H, W]`` or ``[B, H, W]``)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {list(pred.shape)} and target {list(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        if t.numel() and (t.max() >= self.num_classes or t.min() < 0):
            raise ValueError(f"target labels outside 0..{self.num_classes - 1} and not {self.ignore_index}")
        self.matrix += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class IoU ``[K]``: TP / (TP + FP + FN); NaN for a class absent from both."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))).numpy()

    def pixel_accuracy(self) -> float:
        return float(self.matrix.diag().sum() / self.matrix.sum().clamp(min=1))
