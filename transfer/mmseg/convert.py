"""Convert a ContextEncoder checkpoint (dir or Hub id) into an mmseg checkpoint for ``CETimmBackbone``.

Writes ``{"state_dict": {"backbone.body.model.<timm key>": tensor}, "meta": {...}}``, which mmengine reads both
as the backbone's ``init_cfg`` checkpoint (loaded strictly by :class:`~transfer.mmseg.backbone.CETimmBackbone`)
and as a ``load_from`` checkpoint of the whole segmentor.

    python -m transfer.mmseg.convert --model DIR_OR_HUB_ID --output weights/ce_alexnet_mmseg.pth
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ce_pretrain.atomic import write_atomic
from transfer.common.checkpoint import EncoderCheckpoint, load_encoder
from transfer.common.cli import OneLineParser, run_main
from transfer.common.features import TimmFeatures, last_tap

__all__ = ["BACKBONE_PREFIX", "convert", "mmseg_state_dict"]

BACKBONE_PREFIX = "backbone.body.model."


def mmseg_state_dict(ckpt: EncoderCheckpoint) -> dict[str, torch.Tensor]:
    """The encoder (pruned after its last stage, as the FCN uses it) under mmseg segmentor keys."""
    model = ckpt.create_model()
    keep = TimmFeatures(model, [last_tap(model)]).model.state_dict()
    return {BACKBONE_PREFIX + k: ckpt.state_dict[k] for k in keep}


def convert(source: str | EncoderCheckpoint, output: str | Path) -> Path:
    """Write the mmseg checkpoint; returns its path. ``meta`` records the backbone and its preprocessing."""
    ckpt = source if isinstance(source, EncoderCheckpoint) else load_encoder(source)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": ckpt.backbone, "image_size": ckpt.image_size, "mean": [m * 255 for m in ckpt.mean],
            "std": [s * 255 for s in ckpt.std], "source": ckpt.source, "bgr_to_rgb": True}
    data = {"state_dict": mmseg_state_dict(ckpt), "meta": meta}
    return write_atomic(out, lambda tmp: torch.save(data, tmp))


def main(argv: list[str] | None = None) -> int:
    """Bad input: one line on stderr, exit status 2."""
    p = OneLineParser(prog="python -m transfer.mmseg.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ContextEncoder dir, timm encoder dir, Hub id or random:<timm>")
    p.add_argument("--output", required=True, help="the .pth to write")
    return run_main(p, lambda args: print(f"wrote {convert(args.model, args.output)}"), argv, errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
