"""A pretrained encoder as the transfer targets need it: timm weights plus the preprocessing it was trained with.

Sources accepted by :func:`load_encoder`:

* a directory written by ``ContextEncoder.save_pretrained`` (``config.json`` + ``model.safetensors``);
* a timm encoder folder written by ``ce_pretrain.export.save_timm_encoder`` (its ``config.json`` has
  ``architecture``);
* a Hugging Face Hub id of a ``ContextEncoder``;
* ``random:<timm name>`` for the random-initialisation baseline of Table 2.

The paper transfers "the encoder up to pool5" and re-initialises the fully-connected layers (§5.2); the timm
state dict carries the trained trunk and timm's fresh initialisation for everything after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = ["CheckpointError", "EncoderCheckpoint", "check_source", "load_encoder", "load_strict", "load_trained",
           "save_trained"]

RANDOM_PREFIX = "random:"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, or does not fit the model it should load into."""


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` and fail with one line unless every key and shape matches both ways."""
    from ce_pretrain.weights import IncompatibleCheckpointError, load_state_dict_strict

    try:
        load_state_dict_strict(module, state, what)
    except IncompatibleCheckpointError as err:
        raise CheckpointError(str(err)) from None


@dataclass
class EncoderCheckpoint:
    """Encoder weights in timm layout with the input convention they were trained under.

    Attributes:
        backbone: timm architecture name.
        state_dict: full ``num_classes=0`` timm state dict.
        image_size: side of the square pretraining input.
        mean: per-channel RGB mean of [0, 1] pixels.
        std: per-channel RGB std of [0, 1] pixels.
        backbone_kwargs: extra ``timm.create_model`` arguments the encoder was built with.
        source: where it came from, for messages and result tables.
    """

    backbone: str
    state_dict: dict[str, torch.Tensor]
    image_size: int
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
    backbone_kwargs: dict = field(default_factory=dict)
    source: str = ""

    def create_model(self, num_classes: int = 0, **kwargs) -> nn.Module:
        """The timm model with these weights loaded strictly, then a fresh ``num_classes`` classifier if asked.

        Args:
            num_classes: outputs of a freshly initialised classifier; 0 keeps the pooled features.
            kwargs: more ``timm.create_model`` arguments (e.g. ``drop_rate``).
        """
        import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)

        model = timm.create_model(self.backbone, pretrained=False, num_classes=0, **{**self.backbone_kwargs, **kwargs})
        load_strict(model, self.state_dict, f"encoder from {self.source or self.backbone!r}")
        if num_classes:
            model.reset_classifier(num_classes)
        return model

    def save_classifier(self, model: nn.Module, folder: str | os.PathLike, classes: list[str], size: int,
                        **notes) -> None:
        """Write ``model`` (made by :meth:`create_model` with ``len(classes)`` outputs, then trained) as a timm
        folder that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads: ``model.safetensors`` and a
        ``config.json`` naming the architecture, the classes (``label_names``) and the single-crop test transform
        (``pretrained_cfg``: shorter side to size / 0.875, centre crop, this checkpoint's mean and std).

        Args:
            notes: more entries for the config's ``ce_pretrain`` section (e.g. ``multi_label=True``).
        """
        config = {"architecture": self.backbone, "num_classes": len(classes), "label_names": list(classes),
                  "pretrained_cfg": {"input_size": [3, size, size], "mean": list(self.mean), "std": list(self.std),
                                     "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
                                     "num_classes": len(classes), "label_names": list(classes)},
                  "ce_pretrain": {"fine_tuned_from": self.source or self.backbone, **notes}}
        if self.backbone_kwargs:
            config["model_args"] = dict(self.backbone_kwargs)
        _write_model_folder(model, folder, config)


def _from_context_encoder(model, source: str) -> EncoderCheckpoint:
    from ce_pretrain.export import timm_encoder_state_dict

    state, _ = timm_encoder_state_dict(model)
    kwargs = dict(model.config.get("backbone_kwargs") or {})
    return EncoderCheckpoint(
        backbone=model.backbone_name, state_dict=state, image_size=model.image_size,
        mean=tuple(model.mean.flatten().tolist()), std=tuple(model.std.flatten().tolist()),
        backbone_kwargs=kwargs, source=source,
    )


def _from_timm_folder(path: Path, config: dict) -> EncoderCheckpoint:
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"timm encoder folder {str(path)!r} has no model.safetensors")
    cfg = config.get("pretrained_cfg", {})
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return EncoderCheckpoint(
        backbone=config["architecture"], state_dict=load_file(str(weights)), image_size=int(size),
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        backbone_kwargs=dict(config.get("model_args") or {}), source=str(path),
    )


def random_encoder(backbone: str, image_size: int = 227, seed: int = 0) -> EncoderCheckpoint:
    """The random-initialisation baseline: timm's own initialisation of ``backbone`` under ``seed``."""
    import ce_pretrain  # noqa: F401
    from ce_pretrain.model import UnknownBackboneError, resolve_backbone_name

    try:
        resolve_backbone_name(backbone)
    except UnknownBackboneError as err:
        raise CheckpointError(str(err)) from None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = timm.create_model(backbone, pretrained=False, num_classes=0).state_dict()
    return EncoderCheckpoint(backbone=backbone, state_dict=state, image_size=image_size, source=f"random:{backbone}")


def check_source(source: str | os.PathLike) -> None:
    """What :func:`load_encoder` can tell about ``source`` without reading weights or building a model: a known
    timm name after ``random:``, or a folder with a readable ``config.json`` and its ``model.safetensors``. The
    entry points call it before they read any data or create their output folder. A Hub id is left to
    :func:`load_encoder`.

    Raises:
        CheckpointError: one line saying what is wrong.
    """
    source = str(source)
    if source.startswith(RANDOM_PREFIX):
        from ce_pretrain.model import UnknownBackboneError, resolve_backbone_name

        try:
            resolve_backbone_name(source[len(RANDOM_PREFIX):])
        except UnknownBackboneError as err:
            raise CheckpointError(str(err)) from None
        return
    path = Path(source)
    if not path.is_dir():
        if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise CheckpointError(f"checkpoint {source!r} is not a directory (nor a Hub id of the form owner/name)")
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{source!r} has no config.json; expected a ContextEncoder.save_pretrained folder "
                              "or a timm encoder folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(config_file)!r} does not describe a model (not a JSON object)")
    if not (path / "model.safetensors").is_file():
        kind = "timm encoder folder" if "architecture" in config else "model folder"
        raise CheckpointError(f"{kind} {source!r} has no model.safetensors")


def load_encoder(source: str | os.PathLike, image_size: int | None = None, seed: int = 0) -> EncoderCheckpoint:
    """Load a pretrained encoder from a directory, a Hub id, or ``random:<timm name>``.

    Args:
        source: see the module docstring.
        image_size: input size for ``random:`` (default 227); ignored otherwise.
        seed: the initialisation of ``random:`` (the entry points pass their ``--seed``, so seeds measure the
            spread of random initialisations too); ignored otherwise.

    Raises:
        CheckpointError: one line saying what is missing or does not fit.
    """
    source = str(source)
    check_source(source)
    if source.startswith(RANDOM_PREFIX):
        return random_encoder(source[len(RANDOM_PREFIX):], image_size or 227, seed)
    from ce_pretrain import ContextEncoder, IncompatibleCheckpointError

    path = Path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if "architecture" in config:
            return _from_timm_folder(path, config)
    try:
        model = ContextEncoder.from_pretrained(source)
    except (IncompatibleCheckpointError, OSError, TypeError, ValueError) as err:  # OSError: no folder, Hub errors
        raise CheckpointError(f"cannot load ContextEncoder from {source!r}: {str(err).splitlines()[0]}") from None
    return _from_context_encoder(model, source)


def save_trained(model: nn.Module, folder: str | os.PathLike, ckpt: EncoderCheckpoint, task: str,
                 build: dict, label_names: list[str]) -> None:
    """Write a trained transfer model that is no timm model (a torchvision detector or segmenter over the encoder)
    as ``model.safetensors`` and a ``config.json`` holding what rebuilds it: the task, the encoder's architecture
    and preprocessing, the builder's arguments (``build``) and the class names. :func:`load_trained` reads it."""
    config = {"ce_pretrain_task": task, "backbone": ckpt.backbone, "backbone_kwargs": dict(ckpt.backbone_kwargs),
              "image_size": ckpt.image_size, "mean": list(ckpt.mean), "std": list(ckpt.std), "build": build,
              "label_names": list(label_names), "fine_tuned_from": ckpt.source or ckpt.backbone}
    _write_model_folder(model, folder, config)


def _write_model_folder(model: nn.Module, folder: str | os.PathLike, config: dict) -> None:
    """``model.safetensors`` (the state dict, on the CPU) and ``config.json`` in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_trained(folder: str | os.PathLike, task: str) -> tuple[dict, EncoderCheckpoint, dict[str, torch.Tensor]]:
    """Read a folder written by :func:`save_trained` for ``task``.

    Returns:
        ``(config, skeleton, weights)``: the saved config; an :class:`EncoderCheckpoint` of the same architecture
        and preprocessing (timm's initial weights: the builder needs some, ``weights`` then replace them all);
        the saved state dict, to load strictly into the rebuilt model.

    Raises:
        CheckpointError: not such a folder, another task's, or unreadable weights (one line).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r} holds no config.json: not a model saved with --save-model") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(folder / 'config.json')!r} cannot be read: {err}") from None
    if not isinstance(config, dict) or config.get("ce_pretrain_task") != task:
        found = config.get("ce_pretrain_task") if isinstance(config, dict) else None
        raise CheckpointError(f"{str(folder)!r} holds {'a ' + found if found else 'no'} model saved by a transfer "
                              f"run, not a {task}")
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{str(folder / 'model.safetensors')!r} cannot be read: {err}") from None
    kwargs = dict(config.get("backbone_kwargs") or {})
    encoder = timm.create_model(config["backbone"], pretrained=False, num_classes=0, **kwargs)
    skeleton = EncoderCheckpoint(backbone=config["backbone"], state_dict=encoder.state_dict(),
                                 image_size=int(config["image_size"]), mean=tuple(config["mean"]),
                                 std=tuple(config["std"]), backbone_kwargs=kwargs, source=str(folder))
    return config, skeleton, weights
