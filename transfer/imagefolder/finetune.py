"""Fine-tuning mode: the whole encoder plus a fresh classifier, trained by the shared engine (``transfer.common``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from transfer.common.checkpoint import EncoderCheckpoint
from transfer.common.engine import EngineConfig, Task, fit

from .data import LabelledImages, eval_transform, train_transform
from .probes import classification_metrics

__all__ = ["finetune", "save_timm_classifier"]


def save_timm_classifier(model: nn.Module, folder: Path, ckpt: EncoderCheckpoint, classes: list[str],
                         size: int) -> None:
    """Write ``model`` (the backbone with its ``len(classes)``-way classifier) as a timm folder that
    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads: ``model.safetensors`` and a ``config.json``
    naming the architecture, the classes (``label_names``) and the test transform (``pretrained_cfg``)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    config = {"architecture": ckpt.backbone, "num_classes": len(classes), "label_names": list(classes),
              "pretrained_cfg": {"input_size": [3, size, size], "mean": list(ckpt.mean), "std": list(ckpt.std),
                                 "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
                                 "num_classes": len(classes), "label_names": list(classes)},
              "ce_pretrain": {"fine_tuned_from": ckpt.source or ckpt.backbone}}
    if ckpt.backbone_kwargs:
        config["model_args"] = dict(ckpt.backbone_kwargs)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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
        save_timm_classifier(m, folder, ckpt, classes, size)

    task = Task(name="imagefolder-finetune", model=model, optimizer=optimizer,
                train_set=LabelledImages(train, train_transform(size, ckpt.mean, ckpt.std)),
                batch_size=cfg.batch_size, loss=loss, evaluate=evaluate, epochs=cfg.epochs, max_steps=cfg.max_steps,
                scheduler=lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total,
                                                                                 pct_start=0.1),
                drop_last=len(train) > cfg.batch_size, config=asdict(cfg), save=save if cfg.save_model else None)
    result = fit(task, EngineConfig.from_flags(cfg))
    result.pop("config", None)
    return {**result, "rescale": rescale_report}
