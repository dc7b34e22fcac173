"""Convert a ContextEncoder checkpoint (dir or Hub id) into a detectron2 checkpoint plus the config it needs.

Writes ``OUT.pth`` (``{"model": {detectron2 key: tensor}, "__author__": "ce_pretrain"}``, read by detectron2's
``DetectionCheckpointer``) and ``OUT.yaml``: ``MODEL.WEIGHTS``, ``MODEL.TIMM.NAME``, and the input format, pixel
mean and std the encoder was trained with (RGB, its mean/std × 255; detectron2 defaults to BGR Caffe pixels).

    python -m transfer.detectron2.convert --model DIR_OR_HUB_ID --output weights/ce_alexnet_d2 [--[no-]fpn]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ce_pretrain.atomic import write_atomic, write_text_atomic
from transfer.common.checkpoint import EncoderCheckpoint, load_encoder
from transfer.common.cli import OneLineParser, run_main
from transfer.common.features import default_fpn

from .keys import detectron2_state_dict

__all__ = ["convert", "input_config"]


def input_config(ckpt: EncoderCheckpoint) -> dict:
    """detectron2 config values for the encoder's preprocessing (detectron2 pixels are 0-255)."""
    return {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [round(m * 255, 4) for m in ckpt.mean],
            "MODEL.PIXEL_STD": [round(s * 255, 4) for s in ckpt.std], "MODEL.TIMM.NAME": ckpt.backbone}


def convert(source: str | EncoderCheckpoint, output: str | Path, fpn: bool | None = None) -> tuple[Path, Path]:
    """Write ``output.pth`` and ``output.yaml``; returns both paths.

    Args:
        source: ContextEncoder dir, timm encoder dir, Hub id, ``random:<timm>`` or a loaded checkpoint.
        output: path without suffix.
        fpn: for ``build_timm_fpn_backbone``; default: :func:`~transfer.common.features.default_fpn` (an FPN when
            the single-scale tap would drop learned layers: off for the paper's AlexNet, on for a ResNet).
    """
    ckpt = source if isinstance(source, EncoderCheckpoint) else load_encoder(source)
    if fpn is None:
        fpn = default_fpn(ckpt.create_model())
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights, config = out.with_suffix(".pth"), out.with_suffix(".yaml")
    state = {"model": detectron2_state_dict(ckpt, fpn), "__author__": "ce_pretrain", "matching_heuristics": False}
    write_atomic(weights, lambda tmp: torch.save(state, tmp))
    values = {**input_config(ckpt), "MODEL.WEIGHTS": str(weights.resolve()),
              "MODEL.BACKBONE.NAME": "build_timm_fpn_backbone" if fpn else "build_timm_backbone"}
    lines, nested = [], {}
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        nested.setdefault(section, {})[leaf] = value
    for section, leaves in nested.items():
        parts = section.split(".")
        for depth, part in enumerate(parts):
            line = "  " * depth + f"{part}:"
            if line not in lines:
                lines.append(line)
        for leaf, value in leaves.items():
            text = f'"{value}"' if isinstance(value, str) else str(value)
            lines.append("  " * len(parts) + f"{leaf}: {text}")
    write_text_atomic(config, "\n".join(lines) + "\n")
    return weights, config


def main(argv: list[str] | None = None) -> int:
    """Bad input: one line on stderr, exit status 2."""
    p = OneLineParser(prog="python -m transfer.detectron2.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ContextEncoder dir, timm encoder dir, Hub id or random:<timm>")
    p.add_argument("--output", required=True, help="output path without suffix (.pth and .yaml are written)")
    p.add_argument("--fpn", action=argparse.BooleanOptionalAction, default=None,
                   help="for the FPN backbone (default: when the single-scale tap would drop learned layers)")

    def run(args: argparse.Namespace) -> None:
        weights, config = convert(args.model, args.output, args.fpn)
        print(f"wrote {weights} and {config} (merge the latter into your config)")

    return run_main(p, run, argv, errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
