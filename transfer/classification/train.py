"""VOC2007 multi-label classification with a pretrained encoder (§5.2, Table 2 "Classification").

Fine-tuning: the encoder plus freshly initialised fully-connected layers (AlexNet's fc6-fc8, a new classifier for
other timm backbones), trained on random crops and flips; tested with 10 random crops averaged; per-class AP
and mAP by the VOC2007 devkit's 11-point rule. Linear probe (``--linear-probe``): the frozen encoder's feature
map, average-pooled to ``--probe-grid``², flattened, with a logistic-regression layer on top.

    python -m transfer.classification.train --model DIR_OR_HUB_ID --data-root VOCdevkit --year 2007 \\
        --output-dir runs/voc07-cls [--mixed-precision bf16] [--max-time 2h]

Several GPUs: ``accelerate launch -m transfer.classification.train ...`` (``--batch-size`` is per process).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from torch import nn
from torchvision.transforms import v2 as T

from transfer.common import VOC_CLASSES, VOCClassification, check_source, cli, load_encoder
from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.cli import OneLineParser
from transfer.common.engine import EngineConfig, Task, fit
from transfer.common.features import TimmFeatures
from transfer.common.voc import holdout_split, read_split, resolve_voc_dir
from transfer.common.voc_ap import ap_summary, classification_ap, format_per_class

__all__ = ["ClassificationConfig", "run"]


@dataclass
class ClassificationConfig(cli.RunFlags):
    """Flags of the entry point (see ``--help``)."""

    model: str
    data_root: str
    output_dir: str = "runs/voc-classification"
    year: int = 2007
    train_split: str = "trainval"
    test_split: str = "test"
    holdout: float = 0.0
    image_size: int | None = None
    linear_probe: bool = False
    probe_grid: int = 2
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    test_crops: int = 10
    save_model: bool = False


def _splits(cfg: ClassificationConfig) -> tuple[list[str], list[str]]:
    voc = resolve_voc_dir(cfg.data_root, cfg.year)
    if cfg.holdout:
        return holdout_split(read_split(voc, "Main", cfg.train_split), cfg.holdout, cfg.seed)
    return read_split(voc, "Main", cfg.train_split), read_split(voc, "Main", cfg.test_split)


def _transforms(ckpt: EncoderCheckpoint, size: int) -> tuple[T.Compose, T.Compose]:
    normalize = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(ckpt.mean, ckpt.std)]
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.25, 1.0)), T.RandomHorizontalFlip(), *normalize])
    # test: 10 random crops of the image resized so that the crop covers ~88% of its shorter side
    test = T.Compose([T.Resize(round(size / 0.875)), T.RandomCrop(size), T.RandomHorizontalFlip(), *normalize])
    return train, test


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE over present (1) and absent (-1) labels; difficult-only labels (0) are ignored.

    logits, targets: ``[B, 20]``.
    """
    weight = (targets != 0).float()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, (targets > 0).float(), weight=weight,
                                                          reduction="sum")
    return loss / weight.sum().clamp(min=1)


class LinearProbe(nn.Module):
    """Frozen encoder feature map ``[B, C, h, w]`` → pooled to ``grid``² → flattened → linear ``[B, classes]``."""

    def __init__(self, ckpt: EncoderCheckpoint, grid: int, num_classes: int):
        super().__init__()
        model = ckpt.create_model()
        self.features = TimmFeatures(model, [len(model.feature_info) - 1])
        self.features.requires_grad_(False).eval()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Linear(self.features.out_channels[0] * grid * grid, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.features.eval()  # frozen: BatchNorm statistics stay those of pretraining
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.pool(self.features(x)[-1]).flatten(1)  # [B, C * grid²]
        return self.fc(f)


def build_model(ckpt: EncoderCheckpoint, cfg: ClassificationConfig) -> nn.Module:
    if cfg.linear_probe:
        return LinearProbe(ckpt, cfg.probe_grid, len(VOC_CLASSES))
    return ckpt.create_model(num_classes=len(VOC_CLASSES))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: VOCClassification, crops: int, batch_size: int, num_workers: int,
             seed: int, device: torch.device | str = "cpu") -> dict:
    """Average the sigmoid scores of ``crops`` random crops per image; per-class AP and mAP (VOC2007)."""
    model.eval()
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total = None
    for _ in range(crops):
        scores, targets = [], []
        for images, target in loader:
            scores.append(model(images.to(device, non_blocking=True)).float().sigmoid())
            targets.append(target)
        crop_scores = torch.cat(scores)
        total = crop_scores if total is None else total + crop_scores
    aps = classification_ap((total / crops).cpu().numpy(), torch.cat(targets).numpy())
    return ap_summary(aps, VOC_CLASSES)


def run(cfg: ClassificationConfig) -> dict:
    """Train and evaluate; returns ``{"mAP", "per_class_AP", "steps", ...}`` (APs in percent), also written to
    ``<output_dir>/results.json``."""
    cli.check_positive(max_steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size, test_crops=cfg.test_crops,
                   probe_grid=cfg.probe_grid)
    if cfg.save_model and cfg.linear_probe:
        raise cli.UsageError("--save-model keeps a fine-tuned timm classifier; a --linear-probe trains a head on a "
                             "frozen pooled map, which is no timm model")
    check_source(cfg.model)  # a missing or half-written model fails before the data or the output folder
    cli.check_output_dir(cfg.output_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite)
    set_seed(cfg.seed)
    train_ids, test_ids = _splits(cfg)
    ckpt = load_encoder(cfg.model, cfg.image_size, cfg.seed)
    size = cfg.image_size or ckpt.image_size
    train_tf, test_tf = _transforms(ckpt, size)
    train_set = VOCClassification(cfg.data_root, cfg.year, ids=train_ids, transform=train_tf)
    test_set = VOCClassification(cfg.data_root, cfg.year, ids=test_ids, transform=test_tf)
    train_set.check_files()
    test_set.check_files()
    model = build_model(ckpt, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        return masked_bce(model(images), targets)

    def scores(model: nn.Module, device: torch.device) -> dict:
        return evaluate(model, test_set, cfg.test_crops, cfg.batch_size, cfg.num_workers, cfg.seed, device)

    mode = "linear-probe" if cfg.linear_probe else "fine-tune"
    task = Task(name="classification", model=model, optimizer=optimizer, train_set=train_set,
                batch_size=cfg.batch_size, loss=loss, evaluate=scores, epochs=cfg.epochs, max_steps=cfg.max_steps,
                scheduler=lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total,
                                                                                  pct_start=0.1),
                config=cfg, info={"mode": mode, "model": cfg.model, "backbone": ckpt.backbone,
                                  "train_images": len(train_set), "test_images": len(test_set)},
                save=(lambda m, folder: ckpt.save_classifier(m, folder, list(VOC_CLASSES), size, multi_label=True))
                if cfg.save_model else None)
    return fit(task, EngineConfig.from_flags(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m transfer.classification.train", description=__doc__.split("\n\n")[0])
    cli.add_common_args(p, output_dir=ClassificationConfig.output_dir)
    cli.add_voc_args(p, year=2007, train_split="trainval", test_split="test")
    p.add_argument("--image-size", type=int, help="crop size (default: the pretraining size)")
    p.add_argument("--linear-probe", action="store_true", help="freeze the encoder, train a linear layer")
    p.add_argument("--probe-grid", type=int, default=2, help="linear probe: average-pool the map to grid²")
    p.add_argument("--test-crops", type=int, default=10)
    p.add_argument("--save-model", action="store_true",
                   help="keep the fine-tuned classifier (20 sigmoid outputs) in OUTPUT_DIR/model/, a timm folder: "
                        "timm.create_model('local-dir:OUTPUT_DIR/model', pretrained=True)")
    cli.add_training_args(p, epochs=30, batch_size=32, lr=3e-4)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit status (2 for bad input, 130 / 143 when interrupted)."""
    parser = build_parser()

    def report(args: argparse.Namespace) -> None:
        cfg = ClassificationConfig(**vars(args))
        result = run(cfg)
        if result["complete"]:
            print(f"{result['mode']} {result['backbone']}: VOC{cfg.year} classification mAP {result['mAP']:.1f} "
                  f"({result['steps']} steps, {result['test_images']} test images); {cfg.output_dir}/results.json")
            print(format_per_class(result["per_class_AP"]))

    return cli.run_main(parser, report, argv)


if __name__ == "__main__":
    sys.exit(main())
