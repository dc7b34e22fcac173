"""``ContextEncoder``: any timm backbone → bottleneck → up-convolution decoder → the missing pixels (§3)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, hf_hub_download
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from . import backbones as _backbones  # noqa: F401  (registers alexnet, alexnet_poolfree, dcgan_encoder)
from .layers import ChannelWiseFC, UpConvDecoder, dcgan_init_, num_upconvs
from .masks import TRAIN_MASK_KINDS, MaskRule
from .sources import looks_like_hub_id
from .weights import IncompatibleCheckpointError, load_state_dict_strict

__all__ = ["ContextEncoder", "IncompatibleCheckpointError", "UnknownBackboneError", "resolve_backbone_name"]

BOTTLENECKS = ("channel-fc", "fc")


class UnknownBackboneError(ValueError):
    """The backbone name is not a timm architecture."""


def resolve_backbone_name(name: str) -> str:
    """Check that ``name`` is a timm architecture (a ``.tag`` suffix is allowed); suggest close names if not."""
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close += [n for n in names if arch and arch in n and n not in close][: 5 - len(close)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the available names"
    raise UnknownBackboneError(f"unknown backbone {name!r}: not a timm model{hint}")


class Encoder(nn.Module):
    """A timm model cut after its last feature stage: images → feature map ``[B, C, h, w]``.

    Built with ``num_classes=0`` and :meth:`prune_intermediate_layers`, so its state-dict keys are the timm
    model's own (minus the head): the encoder exports straight back to timm and to the transfer adapters.
    """

    def __init__(self, name: str, pretrained: bool = False, in_chans: int = 3, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "prune_intermediate_layers"):
            raise ValueError(
                f"backbone {name!r} does not implement timm's forward_intermediates(), so its feature map cannot "
                "be taken; choose a timm CNN or ViT that does"
            )
        # prune_norm: a final norm unused by forward_intermediates would be an unused parameter under DDP
        self.model.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, C, H, W]`` → ``[B, C', h, w]``."""
        return self.model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")[-1]


class ContextEncoder(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="ce-pretrain",
    tags=["context-encoder", "self-supervised", "inpainting", "image-feature-extraction"],
    license="mit",
    paper_url="https://arxiv.org/abs/1604.07379",
    pipeline_tag="image-feature-extraction",
):
    """Context encoder (Pathak et al., CVPR 2016): predicts the dropped pixels of an image from their context.

    ``pred = model(images, mask)`` with images ``[B, 3, H, W]`` in [0, 1] and a boolean mask ``[B, 1, H, W]``
    (True = dropped). The model normalises the images with ``mean``/``std``, fills the dropped pixels with the
    dataset mean ("the missing region in the masked input image is filled with constant mean value", §4), encodes
    them with the timm ``backbone``, and decodes the prediction, returned in [0, 1] pixel units (unclamped).

    Two bottlenecks join encoder and decoder:

    * ``"channel-fc"`` (feature learning, §3.1): :class:`~ce_pretrain.layers.ChannelWiseFC` with dropout
      ``dropout``, then a stride-1 1×1 convolution across channels.
    * ``"fc"`` (semantic inpainting, §5.1): a convolution over the whole feature map to ``bottleneck_dim`` units
      (4000 in the paper), BatchNorm and LeakyReLU(0.2).

    The prediction covers the whole image, or with ``pred_size`` the central ``pred_size``² square (the
    inpainting preset predicts the 64×64 centre of a 128×128 image; its hole is that square shrunk by
    ``overlap`` px, so the prediction overlaps the context by ``overlap`` px).

    Args:
        backbone: any timm architecture name (``"alexnet"``, ``"resnet50"``, ``"convnext_atto"``...).
        image_size: side of the square input; ``None``: the backbone's own (timm's ``pretrained_cfg['input_size']``:
            227 for AlexNet, 128 for the DCGAN encoder, 224 for most ImageNet models), 227 when timm names none.
        pred_size: side of the central predicted square; ``None`` predicts the whole image.
        overlap: context band (px) covered by the prediction around a central hole (§5.1: 7).
        bottleneck: ``"channel-fc"`` or ``"fc"``.
        bottleneck_dim: units of the ``"fc"`` bottleneck.
        dropout: dropout on the channel-wise fully-connected layer (§5.2: 0.5); 0: none (no dropout module).
        decoder_channels: channels of each up-convolution; ``None`` derives five-ish halving widths.
        mean: per-channel dataset mean in [0, 1] (also the fill of dropped pixels).
        std: per-channel dataset std in [0, 1].
        pretrained_backbone: start from timm's pretrained weights (downloads; the paper trains from scratch).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
        mask: the mask kind the model is trained with (``"center"``, ``"random-block"``, ``"random-region"``, or
            ``"none"`` for the autoencoder baseline); stored in ``config.json`` so inference draws the same masks
            (:attr:`mask_rule`). ``None``: centre holes for a centre prediction, random regions otherwise.
        decoder_norm: ``"batch"`` (BatchNorm after each up-convolution) or ``"none"``
            (:class:`~ce_pretrain.layers.UpConvDecoder`).
    """

    def __init__(
        self,
        backbone: str = "alexnet",
        image_size: int | None = None,
        pred_size: int | None = None,
        overlap: int = 0,
        bottleneck: str = "channel-fc",
        bottleneck_dim: int = 4000,
        dropout: float = 0.5,
        decoder_channels: Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        pretrained_backbone: bool = False,
        backbone_kwargs: dict | None = None,
        mask: str | None = None,
        decoder_norm: str = "batch",
    ):
        super().__init__()
        resolve_backbone_name(backbone)
        if image_size is None:
            from .config import default_image_size

            image_size = default_image_size(backbone, 227)
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        if pred_size is not None and not 0 < pred_size <= image_size:
            raise ValueError(f"pred_size must be in 1..image_size={image_size}, got {pred_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if mask is not None and mask not in TRAIN_MASK_KINDS:
            raise ValueError(f"mask must be one of {', '.join(TRAIN_MASK_KINDS)}, got {mask!r}")
        self._config = dict(backbone=backbone, image_size=image_size, pred_size=pred_size, overlap=overlap,
                            bottleneck=bottleneck, bottleneck_dim=bottleneck_dim, dropout=dropout,
                            decoder_channels=None if decoder_channels is None else list(decoder_channels),
                            mean=tuple(mean), std=tuple(std), pretrained_backbone=pretrained_backbone,
                            backbone_kwargs=backbone_kwargs, mask=mask, decoder_norm=decoder_norm)
        self.backbone_name = backbone
        self.image_size = image_size
        self.pred_size = pred_size or image_size
        self.overlap = overlap
        self.mask_kind = mask or ("center" if self.pred_size < image_size else "random-region")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float).view(1, 3, 1, 1), persistent=False)

        self.encoder = Encoder(backbone, pretrained=pretrained_backbone, **(backbone_kwargs or {}))
        with torch.no_grad():  # the feature map's size, from one tiny forward
            was_training = self.encoder.training
            feat = self.encoder.eval()(torch.zeros(1, 3, image_size, image_size))
            self.encoder.train(was_training)
        _, channels, fh, fw = feat.shape
        self.feature_channels, self.feature_size = channels, (fh, fw)

        if bottleneck == "channel-fc":
            width = (decoder_channels or [min(channels, 256)])[0]
            self.bottleneck = nn.Sequential(
                ChannelWiseFC(channels, fh, fw),
                nn.Dropout(dropout) if dropout else nn.Identity(),  # same module index: the same state-dict keys
                nn.Conv2d(channels, width, 1, bias=False),  # the stride-1 convolution across channels
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
            start, n_up = (fh, fw), num_upconvs(fh, self.pred_size)
        else:
            width = bottleneck_dim
            # a convolution over the whole map is a fully-connected layer: computed as one GEMM
            self.bottleneck = nn.Sequential(
                nn.Flatten(1),
                nn.Linear(channels * fh * fw, bottleneck_dim, bias=False),
                nn.BatchNorm1d(bottleneck_dim),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Unflatten(1, (bottleneck_dim, 1, 1)),
            )
            start, n_up = (1, 1), 1 + num_upconvs(4, self.pred_size)
        if decoder_channels is None:
            top = 512 if bottleneck == "fc" else width
            decoder_channels = [max(32, top // 2**i) for i in range(n_up)]
        self.decoder = UpConvDecoder(width, start, (self.pred_size, self.pred_size), list(decoder_channels),
                                     norm=decoder_norm)
        if bottleneck == "fc":  # the inpainting model is a DCGAN generator: initialise it like one (train.lua)
            dcgan_init_(self.bottleneck)
            dcgan_init_(self.decoder)

    @property
    def config(self) -> dict:
        """Every constructor argument, as ``config.json`` stores it (like timm's ``pretrained_cfg``).

        ``ContextEncoder(**model.config)`` builds the same architecture; defaults are filled in, so a config
        written by an older version still names every argument.
        """
        return dict(self._config)

    # ----------------------------------------------------------------------------------------------- pipeline
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels → the backbone's zero-centred input space."""
        return (images - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The zero-centred space → [0, 1] pixels."""
        return x * self.std + self.mean

    def mask_input(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalise and fill the dropped pixels with the dataset mean (0 once normalised): ``[B, 3, H, W]``."""
        x = self.normalize(images)
        return x.masked_fill(mask, 0.0)

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of the (masked) images: ``[B, 3, H, W]`` → ``[B, C, h, w]``."""
        self._check_inputs(images, mask)
        x = self.normalize(images) if mask is None else self.mask_input(images, mask)
        return self.encoder(x)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → prediction in [0, 1] pixels ``[B, 3, pred_size, pred_size]``."""
        return self.denormalize(self.decoder(self.bottleneck(features)))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, H, W]`` in [0, 1], mask bool ``[B, 1, H, W]`` → ``[B, 3, pred_size, pred_size]``."""
        return self.decode(self.encode(images, mask))

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def pred_box(self) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the predicted region within the image."""
        off = (self.image_size - self.pred_size) // 2
        return off, off, self.pred_size, self.pred_size

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted region of an image-sized tensor ``[B, C, H, W]`` → ``[B, C, pred_size, pred_size]``."""
        top, left, h, w = self.pred_box
        return x[..., top: top + h, left: left + w]

    @property
    def mask_rule(self) -> MaskRule:
        """The masks this model was trained with (kind and overlap band), for training and inference alike."""
        return MaskRule(self.mask_kind, self.image_size, self.overlap if self.pred_size < self.image_size else 0)

    def paste(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Put the prediction back into the images; with a mask, only dropped pixels change: ``[B, 3, H, W]``."""
        top, left, h, w = self.pred_box
        full = images.clone()
        full[..., top: top + h, left: left + w] = pred.to(images.dtype)
        return full if mask is None else torch.where(mask, full, images)

    def _check_inputs(self, images: torch.Tensor, mask: torch.Tensor | None) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this model takes {self.image_size}×{self.image_size} images, got "
                f"{images.shape[-2]}×{images.shape[-1]}; resize or crop them first"
            )
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = dropped), got {mask.dtype}")
            if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != images.shape[0] \
                    or mask.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"mask must be [B, 1, H, W] = {[images.shape[0], 1, *images.shape[-2:]]}, "
                                 f"got {list(mask.shape)}")

    # ------------------------------------------------------------------------------------------ Hub loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> ContextEncoder:
        """Load a model from a ``save_pretrained`` folder or a Hugging Face Hub repository id (``owner/name``).

        A reference that is no folder is tried on the Hub only if it is shaped like a repository id; every failure
        is one line that says which of the two was meant.

        Raises:
            FileNotFoundError: no such folder (and no such Hub model), or a folder without ``config.json`` /
                ``model.safetensors``.
            IncompatibleCheckpointError: the weights do not fit the config, or the weights file is unreadable
                (truncated, not safetensors); the file is named.
        """
        ref = str(pretrained_model_name_or_path)
        path = Path(ref).expanduser()
        if path.is_dir():
            if not (path / constants.CONFIG_NAME).is_file():
                raise FileNotFoundError(f"folder {ref!r} has no {constants.CONFIG_NAME}: it is not a model written "
                                        "by save_pretrained (or ce_pretrain/train.py's --output-dir)")
            if not (path / constants.SAFETENSORS_SINGLE_FILE).is_file():  # before building a model for nothing
                raise FileNotFoundError(f"folder {ref!r} has no {constants.SAFETENSORS_SINGLE_FILE}; is it a "
                                        "directory written by save_pretrained?")
            return super().from_pretrained(str(path), **kwargs)
        if path.exists():
            raise FileNotFoundError(f"{ref!r} is a file; pass the folder written by save_pretrained")
        if not looks_like_hub_id(ref):
            raise FileNotFoundError(f"no such folder: {ref!r}")
        try:
            return super().from_pretrained(ref, **kwargs)
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # huggingface_hub raises many types (offline, not found, gated, HTTP)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"no such folder: {ref!r}, and no Hugging Face Hub model of that name could be "
                                    f"loaded ({reason})") from e

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ) -> ContextEncoder:
        """Build the model from ``config.json`` and load ``model.safetensors`` strictly (see :meth:`load_weights`)."""
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{model_id!r} has no {constants.SAFETENSORS_SINGLE_FILE}; is it a "
                                        "directory written by save_pretrained?")
        else:
            weights = hf_hub_download(
                repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                cache_dir=cache_dir, force_download=force_download, token=token, local_files_only=local_files_only,
            )
        model.load_weights(weights, strict=strict, map_location=map_location)
        model.eval()
        return model

    def load_weights(self, path: str | Path, strict: bool = True, map_location: str = "cpu") -> None:
        """Load a safetensors state dict; with ``strict``, any missing, unexpected or mis-shaped tensor fails.

        Raises:
            IncompatibleCheckpointError: naming the tensors that do not fit this architecture.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=map_location)
        except (SafetensorError, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IncompatibleCheckpointError(f"cannot read weights file {str(path)!r}: {reason} (truncated, or not "
                                              "a safetensors file)") from e
        load_state_dict_strict(self, state, f"checkpoint {str(path)!r}", strict=strict)

    # ------------------------------------------------------------------------------------------- model card
    def generate_model_card(self, *args, training: dict | None = None, evaluation: dict | None = None,
                            repo_id: str | None = None, **kwargs) -> ModelCard:
        """The card ``save_pretrained`` / ``push_to_hub`` write as ``README.md``: ce-pretrain's filled template.

        Pass the run's details through the mixin, e.g. ``model.push_to_hub(repo, model_card_kwargs=dict(
        training=flags, evaluation=numbers))``; see :func:`ce_pretrain.model_card.render_model_card`.
        """
        from .model_card import render_model_card

        return ModelCard(render_model_card(self.config, training, evaluation, model_id=repo_id,
                                           num_parameters=sum(p.numel() for p in self.parameters())))
