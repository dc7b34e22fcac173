"""Train and evaluate an FCN (torchvision) with a pretrained encoder on PASCAL VOC2012 segmentation; mIoU over
the 21 classes, void (255) ignored, at full image resolution.

The paper trains on VOC2012 train with the SBD extra data (``SegmentationClassAug``, split ``train_aug``) and
tests on VOC2012 val (§5.2):

    python -m transfer.torchvision_seg.train --model DIR_OR_HUB_ID --data-root VOCdevkit \\
        --train-split train_aug --test-split val --output-dir runs/voc12-seg [--mixed-precision bf16]

Several GPUs: ``accelerate launch -m transfer.torchvision_seg.train ...`` (``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.nn import functional as F
from torchvision.transforms import v2 as T
from torchvision.tv_tensors import Image, Mask

from transfer.common import VOC_CLASSES, VOCSegmentation, check_source, cli, load_encoder
from transfer.common.checkpoint import save_trained
from transfer.common.cli import OneLineParser
from transfer.common.confusion import ConfusionMatrix
from transfer.common.engine import EngineConfig, Task, fit
from transfer.common.voc import IGNORE_INDEX, holdout_split, read_split, resolve_voc_dir

from .model import TASK, build_fcn

__all__ = ["SegmentationConfig", "evaluate", "run"]

NUM_CLASSES = len(VOC_CLASSES) + 1


@dataclass
class SegmentationConfig(cli.RunFlags):
    """Flags of the entry point (see ``--help``)."""

    model: str
    data_root: str
    year: int = 2012
    train_split: str = "train_aug"
    test_split: str = "val"
    holdout: float = 0.0
    crop_size: int | None = None
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    output_dir: str = "runs/voc-segmentation"
    save_model: bool = False


class _PairTransform:
    """(PIL image, PIL mask) → (image ``[3, H, W]`` in [0, 1], mask ``[H, W]`` long); training adds scale
    jitter, a padded random crop (pad: 0 for the image, void for the mask) and a flip."""

    def __init__(self, crop: int | None):
        ops = [T.ToImage()]
        if crop:
            ops += [T.RandomResize(int(crop * 0.75), int(crop * 1.5)),
                    T.RandomCrop(crop, pad_if_needed=True, fill={Mask: IGNORE_INDEX, "others": 0}),
                    T.RandomHorizontalFlip()]
        self.ops = T.Compose(ops + [T.ToDtype({Image: torch.float32, Mask: torch.int64, "others": None}, scale=True)])

    def __call__(self, image, mask):
        image, mask = self.ops(image, Mask(T.functional.pil_to_tensor(mask)))
        return image, mask[0].long()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: VOCSegmentation, stride: int = 32,
             device: torch.device | str = "cpu") -> dict:
    """mIoU at each image's own resolution (padded to a multiple of ``stride`` for the forward, then cropped)."""
    model.eval()
    confusion = ConfusionMatrix(NUM_CLASSES, IGNORE_INDEX)
    for i in range(len(dataset)):
        image, mask = dataset[i]
        h, w = image.shape[-2:]
        padded = F.pad(image[None].to(device), (0, (-w) % stride, 0, (-h) % stride))
        confusion.update(model(padded)[0, :, :h, :w].argmax(0), mask.to(device))
    iou = confusion.iou()
    return {"mIoU": float(np.nanmean(iou)) * 100, "pixel_accuracy": confusion.pixel_accuracy() * 100,
            "per_class_IoU": {c: (None if math.isnan(v) else v * 100)
                              for c, v in zip(("background", *VOC_CLASSES), iou)}}


def run(cfg: SegmentationConfig) -> dict:
    """Train and evaluate; returns ``{"mIoU", "per_class_IoU", "steps", ...}`` (percent), also written to
    ``<output_dir>/results.json``."""
    cli.check_positive(max_steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size, crop_size=cfg.crop_size)
    check_source(cfg.model)  # a missing or half-written model fails before the data or the output folder
    cli.check_output_dir(cfg.output_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite)
    set_seed(cfg.seed)
    voc = resolve_voc_dir(cfg.data_root, cfg.year)
    if cfg.holdout:
        train_ids, test_ids = holdout_split(read_split(voc, "Segmentation", cfg.train_split), cfg.holdout, cfg.seed)
    else:
        train_ids = read_split(voc, "Segmentation", cfg.train_split)
        test_ids = read_split(voc, "Segmentation", cfg.test_split)
    ckpt = load_encoder(cfg.model, seed=cfg.seed)
    crop = cfg.crop_size or ckpt.image_size
    train_set = VOCSegmentation(cfg.data_root, cfg.year, ids=train_ids, transform=_PairTransform(crop))
    test_set = VOCSegmentation(cfg.data_root, cfg.year, ids=test_ids, transform=_PairTransform(None))
    train_set.check_files()
    test_set.check_files()
    model = build_fcn(ckpt, NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        images, masks = batch
        return F.cross_entropy(model(images).float(), masks, ignore_index=IGNORE_INDEX)

    # fewer training images than one batch: one batch of all of them (crops are of one size, so they stack)
    batch_size = min(cfg.batch_size, len(train_set))
    task = Task(name="segmentation", model=model, optimizer=optimizer, train_set=train_set, batch_size=batch_size,
                loss=loss, evaluate=lambda model, device: evaluate(model, test_set, device=device),
                epochs=cfg.epochs, max_steps=cfg.max_steps, drop_last=True,
                scheduler=lambda opt, total: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=0.9),
                config=cfg, info={"model": cfg.model, "backbone": ckpt.backbone,
                                  "train_images": len(train_set), "test_images": len(test_set)},
                save=(lambda m, folder: save_trained(m, folder, ckpt, TASK, {"num_classes": NUM_CLASSES},
                                                     list(VOC_CLASSES))) if cfg.save_model else None)
    return fit(task, EngineConfig.from_flags(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m transfer.torchvision_seg.train", description=__doc__.split("\n\n")[0])
    cli.add_common_args(p, output_dir=SegmentationConfig.output_dir)
    cli.add_voc_args(p, year=2012, train_split="train_aug", test_split="val")
    p.add_argument("--crop-size", type=int, help="training crop (default: the pretraining size)")
    p.add_argument("--save-model", action="store_true",
                   help="keep the trained segmenter in OUTPUT_DIR/model/ (transfer.torchvision_seg.load_segmenter)")
    cli.add_training_args(p, epochs=30, batch_size=8, lr=1e-3)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit status (2 for bad input, 130 / 143 when interrupted)."""

    def report(args: argparse.Namespace) -> None:
        cfg = SegmentationConfig(**vars(args))
        result = run(cfg)
        if result["complete"]:
            print(f"FCN {result['backbone']}: VOC{cfg.year} segmentation mIoU {result['mIoU']:.1f} "
                  f"({result['steps']} steps, {result['test_images']} test images); {cfg.output_dir}/results.json")

    return cli.run_main(build_parser(), report, argv)


if __name__ == "__main__":
    sys.exit(main())
