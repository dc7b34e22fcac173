"""Export the trained encoder in timm's own Hub layout (``config.json`` + ``model.safetensors``).

The exported folder loads with any of::

    timm.create_model("local-dir:<dir>")                       # or "hf-hub:<repo>" once pushed
    timm.create_model("local-dir:<dir>", num_classes=20)       # fresh classifier for transfer
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="<dir>/model.safetensors",
                                                                         num_classes=0))

The state dict is the timm model's own (``num_classes=0``). Layers that the context encoder never trained (what
follows the last feature map: AlexNet's fc6/fc7, VGG's pre-logits, EfficientNet's ``conv_head``, a ViT's final
norm) are written with timm's fresh initialisation, as the paper re-initialises the fully-connected layers for
transfer (§5.2); ``config.json`` lists them under ``ce_pretrain.reinitialized``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from .atomic import write_atomic, write_text_atomic
from .model import ContextEncoder

__all__ = ["save_timm_encoder", "timm_encoder_state_dict"]


def timm_encoder_state_dict(model: ContextEncoder) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder as a full ``num_classes=0`` timm state dict, and the keys filled with fresh initialisation."""
    kwargs = dict(model.config.get("backbone_kwargs") or {})
    fresh = timm.create_model(model.backbone_name, pretrained=False, num_classes=0, **kwargs).state_dict()
    trained = model.encoder.model.state_dict()
    state, reinit = {}, []
    for key, value in fresh.items():
        if key in trained:
            state[key] = trained[key].detach().cpu().contiguous()
        else:
            state[key] = value.contiguous()
            reinit.append(key)
    return state, reinit


def save_timm_encoder(model: ContextEncoder, directory: str | os.PathLike) -> Path:
    """Write the encoder of ``model`` as a timm model folder; returns the folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state, reinit = timm_encoder_state_dict(model)
    arch = model.backbone_name.split(".", 1)[0]
    cfg = timm.models.get_pretrained_cfg(arch)
    pretrained_cfg = cfg.to_dict() if cfg is not None else {}
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "tag", "state_dict", "custom_load"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(
        num_classes=0,
        input_size=(3, model.image_size, model.image_size),
        mean=tuple(model.mean.flatten().tolist()),
        std=tuple(model.std.flatten().tolist()),
        crop_pct=1.0,
    )
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": model.feature_channels,
        "pretrained_cfg": pretrained_cfg,
        "ce_pretrain": {
            "objective": "context-encoder",
            "feature_map": [model.feature_channels, *model.feature_size],
            "reinitialized": reinit,
        },
    }
    kwargs = model.config.get("backbone_kwargs")
    if kwargs:
        config["model_args"] = kwargs
    write_atomic(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_text_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out
