"""The paper's encoders, registered into timm.

After ``import ce_pretrain`` these work like any timm architecture::

    timm.create_model("alexnet", num_classes=20)
    timm.create_model("alexnet", features_only=True)
    timm.create_model("alexnet_poolfree")
    timm.create_model("dcgan_encoder")

* ``alexnet``: conv1-conv5 + pool5 of Krizhevsky et al. as used in §3.1 of the paper
  (227×227 → 256×6×6), with the Caffe reference model's grouped convolutions and local response normalisation,
  followed by the fc6/fc7 pre-logits and an fc8 classifier (re-initialised for transfer, §5.2).
* ``alexnet_poolfree``: §4, "replacing all pooling layers with convolutions of the same kernel size and stride".
* ``dcgan_encoder``: the encoder of the semantic-inpainting model (§5.1): five stride-2 4×4 convolutions with
  BatchNorm and LeakyReLU(0.2), 128×128 → 512×4×4.

No pretrained weights are registered: these encoders are trained from scratch with the context-encoder objective.
Load trained ones with ``pretrained_cfg_overlay=dict(file=...)`` or ``"local-dir:<dir>"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .layers import dcgan_init_

__all__ = ["AlexNet", "DCGANEncoder"]


def _take_indices(num_taps: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Resolve timm-style ``indices`` (last n if int, all if None, explicit otherwise) to tap numbers."""
    if indices is None:
        take = list(range(num_taps))
    elif isinstance(indices, int):
        if not 0 < indices <= num_taps:
            raise ValueError(f"indices={indices} must be in 1..{num_taps}")
        take = list(range(num_taps - indices, num_taps))
    else:
        take = [i + num_taps if i < 0 else i for i in indices]
        if any(not 0 <= i < num_taps for i in take):
            raise ValueError(f"indices {list(indices)} out of range for {num_taps} feature taps")
    return take, max(take)


class _TappedFeatures(nn.Module):
    """timm's intermediate-feature contract for a model whose trunk is one ``self.features`` Sequential.

    Subclasses set ``self.features`` and ``self.feature_ends`` (the index in ``features`` of each
    ``feature_info`` tap) and implement ``reset_classifier``.
    """

    features: nn.Sequential
    feature_ends: list[int]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the feature maps at the requested taps.

        Args:
            x: images ``[N, C, H, W]``.
            indices: last n taps if int, all if None, else the tap numbers.
            norm: unused, these encoders have no final norm.
            stop_early: stop after the last requested tap.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of feature maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_tap = _take_indices(len(self.feature_ends), indices)
        layers = self.features[: self.feature_ends[max_tap] + 1] if stop_early else self.features
        ends = {end: tap for tap, end in enumerate(self.feature_ends)}
        intermediates = []
        for i, layer in enumerate(layers):
            x = layer(x)
            if i in ends and ends[i] in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last requested tap (and the head, if asked); returns the kept taps."""
        take, max_tap = _take_indices(len(self.feature_ends), indices)
        if max_tap < len(self.feature_ends) - 1:
            self.features = self.features[: self.feature_ends[max_tap] + 1]
            self.feature_ends = self.feature_ends[: max_tap + 1]
            self.feature_info = self.feature_info[: max_tap + 1]
            self.num_features = self.feature_info[-1]["num_chs"]
            prune_head = True  # the head is sized for the final features
        if prune_head:
            self._drop_head()
        return take

    def _drop_head(self) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images ``[N, C, H, W]`` → last feature map ``[N, num_features, h, w]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _pool(channels: int, pool_free: bool) -> nn.Module:
    """3×3 stride-2 max-pool, or (pool-free, §4) a learned convolution with the same kernel and stride."""
    if pool_free:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(inplace=True))
    return nn.MaxPool2d(3, stride=2)


class AlexNet(_TappedFeatures):
    """AlexNet conv1-pool5 with the classic fc6-fc8 head (Caffe reference layout).

    Args:
        num_classes: classifier outputs; 0 keeps the 4096-d fc7 features.
        in_chans: input channels.
        drop_rate: dropout before fc7 and fc8.
        groups: 2 reproduces the two-tower grouped conv2/conv4/conv5 of the original; 1 is the dense variant.
        lrn: local response normalisation after conv1 and conv2, as in the original.
        pool_free: replace the three max-pools by learned stride-2 convolutions (§4).
        global_pool: accepted for timm compatibility; the head always pools adaptively to 6×6 so that any input
            size reaches fc6.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        groups: int = 2,
        lrn: bool = True,
        pool_free: bool = False,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate

        def norm() -> nn.Module:
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if lrn else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, 11, stride=4),  # 0 conv1: 227 → 55
            nn.ReLU(inplace=True),  # 1
            norm(),  # 2
            _pool(96, pool_free),  # 3 pool1: 55 → 27
            nn.Conv2d(96, 256, 5, padding=2, groups=groups),  # 4 conv2
            nn.ReLU(inplace=True),  # 5
            norm(),  # 6
            _pool(256, pool_free),  # 7 pool2: 27 → 13
            nn.Conv2d(256, 384, 3, padding=1),  # 8 conv3
            nn.ReLU(inplace=True),  # 9
            nn.Conv2d(384, 384, 3, padding=1, groups=groups),  # 10 conv4
            nn.ReLU(inplace=True),  # 11
            nn.Conv2d(384, 256, 3, padding=1, groups=groups),  # 12 conv5
            nn.ReLU(inplace=True),  # 13
            _pool(256, pool_free),  # 14 pool5: 13 → 6
        )
        # (tap name, index in features, channels, nominal stride)
        taps = [("relu1", 1, 96, 4), ("relu2", 5, 256, 8), ("relu3", 9, 384, 16), ("relu4", 11, 384, 16),
                ("relu5", 13, 256, 16), ("pool5", 14, 256, 32)]
        self.feature_ends = [idx for _, idx, _, _ in taps]
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"features.{i}") for _, i, c, r in taps]
        self.num_features = 256
        self.head_hidden_size = 4096
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.pre_logits = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(256 * 6 * 6, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.head = nn.Linear(4096, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.005)
                nn.init.zeros_(m.bias)

    def _drop_head(self) -> None:
        self.pool = nn.Identity()
        self.pre_logits = nn.Identity()
        self.head = nn.Identity()
        self.head_hidden_size = self.num_features
        self.num_classes = 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 ``[N, 256, h, w]`` → logits ``[N, num_classes]`` (or fc7 ``[N, 4096]`` with ``pre_logits``)."""
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(x)


class DCGANEncoder(_TappedFeatures):
    """The context encoder of the semantic-inpainting model (§5.1; the original code's ``netE`` up to 4×4).

    Five 4×4 stride-2 convolutions, BatchNorm from the second on, LeakyReLU(0.2): ``[N, 3, 128, 128]`` →
    ``[N, 8·width, 4, 4]``. The 4000-unit bottleneck belongs to :class:`ce_pretrain.ContextEncoder`.

    Args:
        num_classes: classifier outputs (global average pool + linear); 0 for none.
        in_chans: input channels.
        width: filters of the first convolution (the original ``nef``).
        drop_rate: dropout before the classifier.
        global_pool: ``"avg"``, the only pooling offered.
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width: int = 64, drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.num_classes = num_classes
        chans = [width, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        self.feature_ends = []
        self.feature_info = []
        prev = in_chans
        for i, c in enumerate(chans):
            layers.append(nn.Conv2d(prev, c, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.feature_ends.append(len(layers) - 1)
            self.feature_info.append(dict(num_chs=c, reduction=2 ** (i + 1), module=f"features.{len(layers) - 1}"))
            prev = c
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = prev
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        dcgan_init_(self)

    def _drop_head(self) -> None:
        self.pool = nn.Identity()
        self.drop = nn.Identity()
        self.head = nn.Identity()
        self.num_classes = 0

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features ``[N, C, h, w]`` → logits ``[N, num_classes]`` (pooled ``[N, C]`` with ``pre_logits``)."""
        x = self.drop(self.pool(x))
        return x if pre_logits else self.head(x)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 227, 227), "pool_size": (6, 6), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0", "classifier": "head", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "alexnet": _cfg(),
    "alexnet_poolfree": _cfg(),
    "dcgan_encoder": _cfg(input_size=(3, 128, 128), pool_size=(4, 4)),
})


def _create(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    out_indices = kwargs.pop("out_indices", None)
    if out_indices is None:
        out_indices = tuple(range(6 if cls is AlexNet else 5))
    return build_model_with_cfg(
        cls, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs
    )


@register_model
def alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet conv1-pool5 (+ fc6-fc8), the context encoder's feature-learning encoder (§3.1, §5.2)."""
    return _create(AlexNet, "alexnet", pretrained, **kwargs)


@register_model
def alexnet_poolfree(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet with every max-pool replaced by a 3×3 stride-2 convolution (§4)."""
    return _create(AlexNet, "alexnet_poolfree", pretrained, pool_free=True, **kwargs)


@register_model
def dcgan_encoder(pretrained: bool = False, **kwargs) -> DCGANEncoder:
    """DCGAN-style encoder of the semantic-inpainting context encoder (§5.1), 128×128 → 512×4×4."""
    return _create(DCGANEncoder, "dcgan_encoder", pretrained, **kwargs)
