"""Train and evaluate an mmseg FCN over a pretrained encoder on PASCAL VOC2012 + SBD, with mmseg's own
``PascalVOCDataset`` and ``IoUMetric``.

    python -m transfer.mmseg.train --model DIR_OR_HUB_ID --data-root VOCdevkit --work-dir runs/mmseg \\
        [--config transfer/mmseg/configs/fcn_timm_voc12aug.py] [--max-iters N] [--cfg-options KEY=VALUE ...]

The encoder is converted into ``<work-dir>/encoder_mmseg.pth`` and loaded strictly; the head's input channels,
the crop size and the pixel mean/std (the encoder's, × 255, RGB) are set from the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from transfer.common.checkpoint import CheckpointError, load_encoder
from transfer.common.voc import VOCLayoutError, read_split, resolve_voc_dir

from .convert import convert

__all__ = ["build_config", "run"]

CONFIG = Path(__file__).resolve().parent / "configs" / "fcn_timm_voc12aug.py"


def build_config(args: argparse.Namespace) -> Config:
    """The mmseg config with the encoder, its preprocessing and the data root filled in."""
    cfg = Config.fromfile(args.config)
    ckpt = load_encoder(args.model)
    voc = resolve_voc_dir(args.data_root, 2012)
    work_dir = Path(args.work_dir)
    weights = convert(ckpt, work_dir / "encoder_mmseg.pth")
    channels = ckpt.create_model().feature_info[-1]["num_chs"]
    crop = (args.crop_size or ckpt.image_size,) * 2
    preprocessor = dict(cfg.data_preprocessor, mean=[m * 255 for m in ckpt.mean], std=[s * 255 for s in ckpt.std],
                        bgr_to_rgb=True, size=crop)
    cfg.model.data_preprocessor = preprocessor
    cfg.model.backbone.update(model_name=ckpt.backbone, checkpoint=str(weights))
    cfg.model.decode_head.in_channels = channels
    for ds in [*cfg.train_dataloader.dataset.datasets, cfg.val_dataloader.dataset, cfg.test_dataloader.dataset]:
        ds.data_root = str(voc)
        read_split(voc, "Segmentation", Path(ds.ann_file).stem)  # one clear line if a split file is missing
        for step in ds.pipeline:
            if step["type"] == "RandomCrop":
                step["crop_size"] = crop
    cfg.work_dir = str(work_dir)
    if args.max_iters:
        cfg.train_cfg.max_iters = args.max_iters
        cfg.train_cfg.val_interval = args.max_iters
        cfg.param_scheduler[0]["end"] = args.max_iters
        cfg.default_hooks.checkpoint.interval = args.max_iters
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def run(args: argparse.Namespace) -> dict:
    """Train, then evaluate on the test split; returns mmseg's metrics (``{"mIoU": ..., "aAcc": ...}``)."""
    runner = Runner.from_cfg(build_config(args))
    runner.train()
    return runner.test()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ContextEncoder dir, timm encoder dir, Hub id or random:<timm>")
    p.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC2012 itself)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--work-dir", default="runs/mmseg")
    p.add_argument("--crop-size", type=int, help="training crop (default: the pretraining size)")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="KEY=VALUE config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        metrics = run(parse_args(argv))
    except (CheckpointError, VOCLayoutError) as err:
        sys.exit(f"error: {err}")
    print(" ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
