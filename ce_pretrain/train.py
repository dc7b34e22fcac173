"""Context-encoder pretraining under Hugging Face accelerate.

    accelerate launch ce_pretrain/train.py --backbone alexnet            # the paper's feature-learning recipe
    accelerate launch ce_pretrain/train.py --preset inpainting           # the semantic-inpainting recipe (§5.1)
    python ce_pretrain/train.py --backbone resnet50 --data /imagenet/train --mixed-precision bf16

accelerate owns devices, precision and processes: the same script runs on a CPU, one GPU, or many nodes. With no
``--data`` it trains on a small built-in sample of real photographs (a demo, not a real run).

This file is only the entry point: flags → config (:mod:`ce_pretrain.config`) → checks of everything that can be
checked before any work (backbone and image size, data, output folder) → run (:mod:`ce_pretrain.engine`);
``ce-pretrain train`` is the same command. Outputs in ``--output-dir``: ``config.json`` + ``model.safetensors`` +
``README.md`` (``ContextEncoder.from_pretrained``), ``timm-encoder/`` (the encoder in timm's layout),
``checkpoints/step_*`` (written atomically), ``samples/*.png`` (masked input | prediction | original), ``logs/`` and
``train_summary.json``.

Exit status: 0 when done (or stopped by ``--max-time``, with a checkpoint), 2 for bad input (one line on stderr,
nothing written), 1 when training diverged, 130 / 143 when stopped by SIGINT / SIGTERM (with a checkpoint).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ce_pretrain.checkpoint import check_resumable, latest_checkpoint, read_run_json
from ce_pretrain.config import ConfigError, build_parser, check_backbone_size, resolve_config
from ce_pretrain.data import DataSourceError
from ce_pretrain.engine import run
from ce_pretrain.model import UnknownBackboneError, resolve_backbone_name
from ce_pretrain.sources import open_source

__all__ = ["main"]


def _resume_command(prog: str, argv: list[str]) -> str:
    """The command line that continues this run: the same flags, with ``--resume``."""
    args = [a for a in argv if a != "--overwrite"]
    if not any(a == "--resume" or a.startswith("--resume=") for a in args):
        args.append("--resume")
    launcher = "python ce_pretrain/train.py" if prog.endswith(".py") else prog
    return f"{launcher} {shlex.join(args)}"


def main(argv: list[str] | None = None, prog: str = "ce_pretrain/train.py") -> int:
    """Parse flags, check them, the data source and the output folder, then train.

    Bad input: one line on stderr, exit code 2, nothing written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = resolve_config(args)
        try:
            resolve_backbone_name(cfg.backbone)
            check_backbone_size(cfg.backbone, cfg.image_size, cfg.batch_size)
            items, column, description = open_source(cfg.data, cfg.data_split, streaming=cfg.streaming)
        except (DataSourceError, UnknownBackboneError) as e:
            raise ConfigError(str(e)) from e
        if cfg.resume not in (None, "latest"):
            read_run_json(Path(cfg.resume))
            check_resumable(Path(cfg.resume), cfg)
        elif cfg.resume == "latest" and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
            check_resumable(ckpt, cfg)
        summary = run(cfg, items, column, description, resume_command=_resume_command(prog, argv))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signal
        print(f"{prog}: interrupted before training started", file=sys.stderr)
        return 130
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
