"""VOC average precision: the devkit's 11-point interpolated AP (VOC2007) or the area under the monotone
precision envelope (VOC2010+), for detection (mAP@0.5 IoU) and for multi-label classification."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ap_summary", "classification_ap", "detection_ap", "format_per_class", "voc_ap"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision/recall curve ordered by decreasing score.

    VOC2007: mean over t in {0, 0.1, ..., 1} of the best precision at recall ≥ t (0 where never reached).
    Otherwise: the area under precision made monotone non-increasing.
    """
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one continuous xyxy box ``[4]`` with ``[N, 4]`` (continuous boxes need no devkit "+1")."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(float).eps)


def detection_ap(
    detections: Sequence[tuple[str, float, Sequence[float]]],
    ground_truth: Mapping[str, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> float:
    """AP of one class, as the VOC devkit's ``voc_eval``.

    Detections are taken by decreasing score; each is a true positive if its best-overlapping ground-truth box
    (IoU > threshold) is not difficult and not yet matched, ignored if that box is difficult, and a false
    positive otherwise. Difficult boxes do not count towards recall.

    Args:
        detections: ``(image_id, score, [x0, y0, x1, y1])`` of this class, continuous coordinates.
        ground_truth: image_id → (boxes ``[M, 4]``, difficult ``[M]`` bool) of this class, for every test image.
        iou_threshold: overlap needed (the devkit's ``ovmax > 0.5``).
        use_07_metric: 11-point AP (VOC2007) or area AP.

    Returns:
        AP in [0, 1]; NaN when the class has no non-difficult ground truth.
    """
    npos = sum(int((~np.asarray(d, bool)).sum()) for _, d in ground_truth.values())
    if npos == 0:
        return float("nan")
    matched = {k: np.zeros(len(b), bool) for k, (b, _) in ground_truth.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, i in enumerate(order):
        image_id, _, box = detections[i]
        boxes, difficult = ground_truth.get(image_id, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = _iou(np.asarray(box, float), np.asarray(boxes, float))
        j = int(overlaps.argmax())
        if overlaps[j] > iou_threshold:
            if difficult[j]:
                continue
            if not matched[image_id][j]:
                tp[rank], matched[image_id][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    return voc_ap(recall, precision, use_07_metric)


def classification_ap(scores: np.ndarray, targets: np.ndarray, use_07_metric: bool = True) -> np.ndarray:
    """Per-class AP of multi-label scores, as the devkit's ``VOCevalcls``.

    Args:
        scores: ``[N, C]`` confidences.
        targets: ``[N, C]`` in {1 present, -1 absent, 0 ignored (difficult only)}.

    Returns:
        ``[C]`` APs (NaN for a class with no positive).
    """
    scores, targets = np.asarray(scores, float), np.asarray(targets)
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = targets[:, c] != 0
        gt = targets[keep, c] > 0
        if not gt.any():
            continue
        order = np.argsort(-scores[keep, c], kind="stable")
        tp = np.cumsum(gt[order])
        fp = np.cumsum(~gt[order])
        aps[c] = voc_ap(tp / gt.sum(), tp / (tp + fp), use_07_metric)
    return aps


def ap_summary(aps: Sequence[float], classes: Sequence[str]) -> dict:
    """Per-class APs (fractions, NaN for a class absent from the test set) → ``{"mAP", "per_class_AP"}`` in percent,
    absent classes as ``None`` and left out of the mean."""
    aps = np.asarray(aps, dtype=float)
    return {"mAP": float(np.nanmean(aps)) * 100,
            "per_class_AP": {c: (None if math.isnan(a) else a * 100) for c, a in zip(classes, aps)}}


def format_per_class(per_class: Mapping[str, float | None]) -> str:
    """``"  aeroplane 12.3  bicycle 4.5 ..."``: the classes that have an AP, for the line after a result."""
    return "  " + "  ".join(f"{c} {a:.1f}" for c, a in per_class.items() if a is not None)
