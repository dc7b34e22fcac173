"""Fine-tuning mode: the whole encoder plus a fresh classifier, trained by the shared engine (``transfer.common``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.engine import EngineConfig, Task, fit

from .data import LabelledImages, eval_transform, train_transform
from .probes import classification_metrics

__all__ = ["finetune"]


@torch.no_grad()
def _scores(model: nn.Module, dataset: LabelledImages, batch_size: int, num_workers: int,
            device: torch.device) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return torch.cat([model(images.to(device, non_blocking=True)).float() for images, _ in loader]).cpu()


def finetune(cfg, ckpt: EncoderCheckpoint, train: list, val: list, classes: list[str], size: int,
             device: torch.device) -> dict:
    """Fine-tune on ``train`` (random-resized crops, flips), test on centre crops of ``val``.

    Args:
        cfg: the :class:`~transfer.imagefolder.train.ImageFolderConfig`.
        ckpt: the encoder.
        train, val: ``(path, label)`` samples.
        classes: class names, indexed by label.
        size: crop side.
        device: where ``--rescale`` calibrates (the engine places the model itself).

    Returns:
        ``top1``, ``top5``, ``mean_per_class``, ``per_class`` and the engine's ``steps``, ``final_loss``, ...
    """
    from accelerate.utils import set_seed

    from .train import build_encoder

    set_seed(cfg.seed)  # the fresh classifier and the data order
    model, rescale_report = build_encoder(ckpt, cfg, train, size, device, num_classes=len(classes))
    model = model.cpu()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    val_set = LabelledImages(val, eval_transform(size, ckpt.mean, ckpt.std))

    def loss(m: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch
        logits = m(images)
        return nn.functional.cross_entropy(logits, labels), {"accuracy": (logits.argmax(1) == labels).float().mean()}

    def evaluate(m: nn.Module, dev: torch.device) -> dict:
        return classification_metrics(_scores(m, val_set, cfg.batch_size, cfg.num_workers, dev), val_set.labels,
                                      classes)

    def save(m: nn.Module, folder: Path) -> None:
        ckpt.save_classifier(m, folder, classes, size)

    task = Task(name="imagefolder-finetune", model=model, optimizer=optimizer,
                train_set=LabelledImages(train, train_transform(size, ckpt.mean, ckpt.std)),
                batch_size=cfg.batch_size, loss=loss, evaluate=evaluate, epochs=cfg.epochs, max_steps=cfg.max_steps,
                scheduler=lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total,
                                                                                 pct_start=0.1),
                drop_last=len(train) > cfg.batch_size, config=cfg, save=save if cfg.save_model else None)
    result = fit(task, EngineConfig.from_flags(cfg))
    result.pop("config", None)
    return {**result, "rescale": rescale_report}
