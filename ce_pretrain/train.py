"""Context-encoder pretraining under Hugging Face accelerate.

    accelerate launch ce_pretrain/train.py --backbone alexnet            # the paper's feature-learning recipe
    accelerate launch ce_pretrain/train.py --preset inpainting           # the semantic-inpainting recipe (§5.1)
    python ce_pretrain/train.py --backbone resnet50 --data /imagenet/train --mixed-precision bf16

accelerate owns devices, precision and processes: the same script runs on a CPU, one GPU, or many nodes. With no
``--data`` it trains on a small built-in sample of real photographs (a demo, not a real run).

This file is only the entry point: flags → config (:mod:`ce_pretrain.config`) → run (:mod:`ce_pretrain.engine`);
``ce-pretrain train`` is the same command. Outputs in ``--output-dir``: ``config.json`` + ``model.safetensors`` +
``README.md`` (``ContextEncoder.from_pretrained``), ``timm-encoder/`` (the encoder in timm's layout),
``checkpoints/step_*`` (written atomically), ``samples/*.png`` (masked input | prediction | original), ``logs/`` and
``train_summary.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ce_pretrain.checkpoint import check_resumable, latest_checkpoint
from ce_pretrain.config import ConfigError, build_parser, resolve_config
from ce_pretrain.data import DataSourceError, open_source
from ce_pretrain.engine import run
from ce_pretrain.model import UnknownBackboneError, resolve_backbone_name

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "ce_pretrain/train.py") -> int:
    """Parse flags, check them and the data source, then train. Bad input: one line on stderr, exit code 2."""
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = resolve_config(args)
        try:
            resolve_backbone_name(cfg.backbone)
            items, column, description = open_source(cfg.data, cfg.data_split, streaming=cfg.streaming)
        except (DataSourceError, UnknownBackboneError) as e:
            raise ConfigError(str(e)) from e
        if cfg.resume not in (None, "latest"):
            if not (Path(cfg.resume) / "run.json").is_file():
                raise ConfigError(f"--resume {cfg.resume!r} is not a checkpoint folder (no run.json)")
            check_resumable(Path(cfg.resume), cfg)
        elif cfg.resume == "latest" and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
            check_resumable(ckpt, cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, items, column, description)
    except FloatingPointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
