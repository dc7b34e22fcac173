"""Train and evaluate Faster R-CNN (torchvision) with a pretrained encoder on PASCAL VOC; mAP@0.5 by the
VOC2007 devkit rule (11-point AP, difficult objects ignored).

    python -m transfer.torchvision_det.train --model DIR_OR_HUB_ID --data-root VOCdevkit --year 2007
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from transfer.common import VOC_CLASSES, VOCDetection, load_encoder
from transfer.common.voc import holdout_split, read_split, resolve_voc_dir
from transfer.common.voc_ap import detection_ap

from .model import build_faster_rcnn

__all__ = ["DetectionConfig", "evaluate", "run"]


@dataclass
class DetectionConfig:
    """Flags of the entry point (see ``--help``)."""

    model: str
    data_root: str
    year: int = 2007
    train_split: str = "trainval"
    test_split: str = "test"
    holdout: float = 0.0
    fpn: bool | None = None
    min_size: int = 600
    max_size: int = 1000
    test_proposals: int = 1000
    epochs: int = 12
    max_steps: int | None = None
    batch_size: int = 2
    lr: float = 0.01
    weight_decay: float = 1e-4
    workers: int = 2
    seed: int = 0
    output: str | None = None


def _flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Random horizontal flip of ``image [3, H, W]`` and its continuous xyxy boxes."""
    if torch.rand(()) < 0.5:
        width = image.shape[-1]
        image = image.flip(-1)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target = {**target, "boxes": boxes}
    return image, target


def _collate(batch):
    return tuple(zip(*batch))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: VOCDetection, workers: int = 0) -> dict:
    """Run ``model`` over ``dataset`` (which must keep difficult objects) and compute VOC2007 AP per class."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=_collate)
    detections = {c: [] for c in range(len(VOC_CLASSES))}
    ground_truth = {c: {} for c in range(len(VOC_CLASSES))}
    for images, targets in loader:
        (out,), (target,) = model(list(images)), targets
        image_id = target["image_id"]
        for c in range(len(VOC_CLASSES)):
            sel = target["labels"] == c + 1
            ground_truth[c][image_id] = (target["boxes"][sel].numpy(), target["difficult"][sel].numpy())
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
            detections[label - 1].append((image_id, score, box))
    aps = np.array([detection_ap(detections[c], ground_truth[c]) for c in range(len(VOC_CLASSES))])
    return {"mAP": float(np.nanmean(aps)) * 100,
            "per_class_AP": {c: (None if math.isnan(a) else a * 100) for c, a in zip(VOC_CLASSES, aps)}}


def run(cfg: DetectionConfig) -> dict:
    """Train and evaluate; returns ``{"mAP", "per_class_AP", "steps", ...}`` (APs in percent)."""
    torch.manual_seed(cfg.seed)
    ckpt = load_encoder(cfg.model)
    voc = resolve_voc_dir(cfg.data_root, cfg.year)
    if cfg.holdout:
        train_ids, test_ids = holdout_split(read_split(voc, "Main", cfg.train_split), cfg.holdout, cfg.seed)
    else:
        train_ids, test_ids = read_split(voc, "Main", cfg.train_split), read_split(voc, "Main", cfg.test_split)
    train_set = VOCDetection(cfg.data_root, cfg.year, ids=train_ids, transform=_flip)
    train_set.ids = [i for i in train_set.ids if len(train_set.annotation(i).labels)]
    test_set = VOCDetection(cfg.data_root, cfg.year, ids=test_ids, keep_difficult=True)
    model = build_faster_rcnn(ckpt, len(VOC_CLASSES) + 1, cfg.fpn, cfg.min_size, cfg.max_size,
                              rpn_post_nms_top_n_test=cfg.test_proposals)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate,
                                         num_workers=cfg.workers, persistent_workers=cfg.workers > 0)
    total = cfg.max_steps or cfg.epochs * len(loader)
    warmup = min(100, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step, losses = 0, []
    model.train()
    while step < total:
        for images, targets in loader:
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            loss = sum(model(list(images), targets).values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detection loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
    result = evaluate(model, test_set, cfg.workers)
    result.update(task="detection", model=cfg.model, backbone=ckpt.backbone, steps=step,
                  final_loss=float(np.mean(losses[-10:])), train_images=len(train_set), test_images=len(test_set))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps({"config": asdict(cfg), **result}, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> DetectionConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ContextEncoder dir, timm encoder dir, Hub id or random:<timm>")
    p.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC<year> itself)")
    p.add_argument("--year", type=int, default=2007)
    p.add_argument("--train-split", default="trainval")
    p.add_argument("--test-split", default="test")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="test on this fraction held out of --train-split instead of --test-split")
    p.add_argument("--fpn", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-scale FPN (default: off for AlexNet, on otherwise)")
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--test-proposals", type=int, default=1000, help="RPN proposals kept per test image")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON here")
    return DetectionConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    from transfer.common import CheckpointError, VOCLayoutError

    cfg = parse_args(argv)
    try:
        result = run(cfg)
    except (CheckpointError, VOCLayoutError) as err:
        sys.exit(f"error: {err}")
    print(f"Faster R-CNN {result['backbone']}: VOC{cfg.year} detection mAP@0.5 {result['mAP']:.1f} "
          f"({result['steps']} steps, {result['test_images']} test images)")
    print("  " + "  ".join(f"{c} {a:.1f}" for c, a in result["per_class_AP"].items() if a is not None))


if __name__ == "__main__":
    main()
