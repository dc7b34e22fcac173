"""Train and evaluate Faster R-CNN (torchvision) with a pretrained encoder on PASCAL VOC; mAP@0.5 by the
VOC2007 devkit rule (11-point AP, difficult objects ignored).

    python -m transfer.torchvision_det.train --model DIR_OR_HUB_ID --data-root VOCdevkit --year 2007 \\
        --output-dir runs/voc07-det [--mixed-precision bf16] [--max-time 2h]

Several GPUs: ``accelerate launch -m transfer.torchvision_det.train ...`` (``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed

from transfer.common import VOC_CLASSES, VOCDetection, check_source, cli, load_encoder
from transfer.common.checkpoint import save_trained
from transfer.common.cli import OneLineParser
from transfer.common.engine import EngineConfig, Task, fit
from transfer.common.voc import holdout_split, read_split, resolve_voc_dir
from transfer.common.voc_ap import ap_summary, detection_ap, format_per_class

from .model import TASK, build_faster_rcnn

__all__ = ["DetectionConfig", "evaluate", "run"]


@dataclass
class DetectionConfig(cli.RunFlags):
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
    output_dir: str = "runs/voc-detection"
    save_model: bool = False


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
def evaluate(model: torch.nn.Module, dataset: VOCDetection, num_workers: int = 0,
             device: torch.device | str = "cpu") -> dict:
    """Run ``model`` over ``dataset`` (which must keep difficult objects) and compute VOC2007 AP per class."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=_collate)
    detections = {c: [] for c in range(len(VOC_CLASSES))}
    ground_truth = {c: {} for c in range(len(VOC_CLASSES))}
    for images, targets in loader:
        (out,), (target,) = model([image.to(device) for image in images]), targets
        out = {k: v.float().cpu() for k, v in out.items()}
        image_id = target["image_id"]
        for c in range(len(VOC_CLASSES)):
            sel = target["labels"] == c + 1
            ground_truth[c][image_id] = (target["boxes"][sel].numpy(), target["difficult"][sel].numpy())
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
            detections[label - 1].append((image_id, score, box))
    aps = np.array([detection_ap(detections[c], ground_truth[c]) for c in range(len(VOC_CLASSES))])
    return ap_summary(aps, VOC_CLASSES)


def run(cfg: DetectionConfig) -> dict:
    """Train and evaluate; returns ``{"mAP", "per_class_AP", "steps", ...}`` (APs in percent), also written to
    ``<output_dir>/results.json``."""
    cli.check_positive(max_steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size, min_size=cfg.min_size,
                   max_size=cfg.max_size, test_proposals=cfg.test_proposals)
    check_source(cfg.model)  # a missing or half-written model fails before the data or the output folder
    cli.check_output_dir(cfg.output_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite)
    set_seed(cfg.seed)
    voc = resolve_voc_dir(cfg.data_root, cfg.year)
    if cfg.holdout:
        train_ids, test_ids = holdout_split(read_split(voc, "Main", cfg.train_split), cfg.holdout, cfg.seed)
    else:
        train_ids, test_ids = read_split(voc, "Main", cfg.train_split), read_split(voc, "Main", cfg.test_split)
    train_set = VOCDetection(cfg.data_root, cfg.year, ids=train_ids, transform=_flip)
    test_set = VOCDetection(cfg.data_root, cfg.year, ids=test_ids, keep_difficult=True)
    train_set.check_files()
    test_set.check_files()
    train_set.ids = [i for i in train_set.ids if len(train_set.annotation(i).labels)]
    ckpt = load_encoder(cfg.model, seed=cfg.seed)
    build = {"num_classes": len(VOC_CLASSES) + 1, "fpn": cfg.fpn, "min_size": cfg.min_size, "max_size": cfg.max_size,
             "rpn_post_nms_top_n_test": cfg.test_proposals}
    model = build_faster_rcnn(ckpt, **build)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = min(100, max(1, total // 10))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        return sum(model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]).values())

    task = Task(name="detection", model=model, optimizer=optimizer, train_set=train_set, batch_size=cfg.batch_size,
                loss=loss, evaluate=lambda model, device: evaluate(model, test_set, cfg.num_workers, device),
                epochs=cfg.epochs, max_steps=cfg.max_steps, scheduler=schedule, collate_fn=_collate,
                clip_grad_norm=10.0, config=cfg,
                info={"model": cfg.model, "backbone": ckpt.backbone, "train_images": len(train_set),
                      "test_images": len(test_set)},
                save=(lambda m, folder: save_trained(m, folder, ckpt, TASK, build, list(VOC_CLASSES)))
                if cfg.save_model else None)
    return fit(task, EngineConfig.from_flags(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m transfer.torchvision_det.train", description=__doc__.split("\n\n")[0])
    cli.add_common_args(p, output_dir=DetectionConfig.output_dir)
    cli.add_voc_args(p, year=2007, train_split="trainval", test_split="test")
    p.add_argument("--fpn", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-scale FPN (default: where a single stride-16 map would drop learned layers, e.g. "
                        "ResNets; not for AlexNet)")
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--test-proposals", type=int, default=1000, help="RPN proposals kept per test image")
    p.add_argument("--save-model", action="store_true",
                   help="keep the trained detector in OUTPUT_DIR/model/ (transfer.torchvision_det.load_detector)")
    cli.add_training_args(p, epochs=12, batch_size=2, lr=0.01)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit status (2 for bad input, 130 / 143 when interrupted)."""

    def report(args: argparse.Namespace) -> None:
        cfg = DetectionConfig(**vars(args))
        result = run(cfg)
        if result["complete"]:
            print(f"Faster R-CNN {result['backbone']}: VOC{cfg.year} detection mAP@0.5 {result['mAP']:.1f} "
                  f"({result['steps']} steps, {result['test_images']} test images); {cfg.output_dir}/results.json")
            print(format_per_class(result["per_class_AP"]))

    return cli.run_main(build_parser(), report, argv)


if __name__ == "__main__":
    sys.exit(main())
