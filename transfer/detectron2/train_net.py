"""Train and evaluate a detectron2 detector over a pretrained encoder on PASCAL VOC, with detectron2's own
``PascalVOCDetectionEvaluator`` (VOC2007: 11-point AP at IoU 0.5).

    python -m transfer.detectron2.train_net --config-file transfer/detectron2/configs/fast_rcnn_alexnet_voc07.yaml \\
        --model DIR_OR_HUB_ID --data-root VOCdevkit --proposals-dir PROPOSALS [--eval-only] [KEY VALUE ...]

``--model`` is converted (:mod:`transfer.detectron2.convert`) into ``OUTPUT_DIR``, which also sets the input
format, pixel mean and std to the encoder's. Datasets are registered from ``--data-root`` as
``ce_voc_<year>_<split>``; Fast R-CNN configs read ``<proposals-dir>/voc_<year>_<split>.pkl``
(see :mod:`transfer.detectron2.proposals`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.datasets.pascal_voc import register_pascal_voc
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import PascalVOCDetectionEvaluator

from transfer.common.checkpoint import CheckpointError, load_encoder
from transfer.common.voc import VOCLayoutError, read_split, resolve_voc_dir

from .backbone import add_timm_config
from .convert import convert
from .keys import BACKBONE_PREFIX, FPN_BACKBONE_PREFIX

__all__ = ["Trainer", "check_weights_fit", "register_voc", "setup"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def register_voc(data_root: str, year: int, splits: list[str]) -> list[str]:
    """Register ``ce_voc_<year>_<split>`` for each split under ``data_root``; returns the names."""
    voc = resolve_voc_dir(data_root, year)
    names = []
    for split in splits:
        read_split(voc, "Main", split)  # a clear error now rather than inside a data-loader worker
        name = f"ce_voc_{year}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            from detectron2.data import MetadataCatalog

            MetadataCatalog.remove(name)
        register_pascal_voc(name, str(voc), split, year)
        names.append(name)
    return names


def check_weights_fit(model: torch.nn.Module, weights: str) -> None:
    """Every backbone tensor of ``model`` must be in ``weights`` with its shape, and nothing else may be there.

    Raises:
        CheckpointError: naming the offending keys (detectron2 itself only warns).
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    own = {k: v for k, v in model.state_dict().items()
           if k.startswith((BACKBONE_PREFIX, FPN_BACKBONE_PREFIX)) and "num_batches_tracked" not in k}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in model.state_dict())
    shapes = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{weights} does not fit the detectron2 model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, mis-shaped {shapes[:4]}")


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` that refuses partial backbone loads and evaluates with the VOC evaluator."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            check_weights_fit(model, cfg.MODEL.WEIGHTS)
        return model

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return PascalVOCDetectionEvaluator(dataset_name)


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from file + encoder preprocessing + converted weights + VOC datasets + command-line overrides."""
    cfg = add_timm_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    ckpt = load_encoder(args.model)
    fpn = cfg.MODEL.BACKBONE.NAME == "build_timm_fpn_backbone"
    _, snippet = convert(ckpt, Path(cfg.OUTPUT_DIR) / "encoder_detectron2", fpn=fpn)
    cfg.merge_from_file(str(snippet))
    train = register_voc(args.data_root, args.year, [s.rsplit("_", 1)[-1] for s in cfg.DATASETS.TRAIN])
    test = register_voc(args.data_root, args.year, [s.rsplit("_", 1)[-1] for s in cfg.DATASETS.TEST])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    if cfg.MODEL.LOAD_PROPOSALS:
        if not args.proposals_dir:
            raise VOCLayoutError("this config uses precomputed proposals: pass --proposals-dir")

        def files(names: list[str]) -> tuple[str, ...]:
            paths = [Path(args.proposals_dir) / f"{n.removeprefix('ce_')}.pkl" for n in names]
            for path in paths:
                if not path.is_file():
                    raise VOCLayoutError(f"proposal file {str(path)!r} is missing (convert the selective-search "
                                         ".mat files with python -m transfer.detectron2.proposals)")
            return tuple(str(p) for p in paths)

        cfg.DATASETS.PROPOSAL_FILES_TRAIN, cfg.DATASETS.PROPOSAL_FILES_TEST = files(train), files(test)
    cfg.merge_from_list(args.opts)  # the user's word is final, even over the encoder's preprocessing
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=str(CONFIG_DIR / "fast_rcnn_alexnet_voc07.yaml"))
    p.add_argument("--model", required=True, help="ContextEncoder dir, timm encoder dir, Hub id or random:<timm>")
    p.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC<year> itself)")
    p.add_argument("--year", type=int, default=2007)
    p.add_argument("--proposals-dir", help="folder of voc_<year>_<split>.pkl proposal files (Fast R-CNN)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    args.config_file, args.num_gpus, args.machine_rank, args.num_machines = args.config_file, 1, 0, 1
    return args


def run(args: argparse.Namespace) -> dict:
    """Train (unless ``--eval-only``) and evaluate; returns detectron2's results (``{"bbox": {"AP50": ...}}``)."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    return Trainer.test(cfg, trainer.model)


def main(argv: list[str] | None = None) -> None:
    try:
        results = run(parse_args(argv))
    except (CheckpointError, VOCLayoutError) as err:
        sys.exit(f"error: {err}")
    for task, metrics in results.items():
        print(task, " ".join(f"{k} {v:.1f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
