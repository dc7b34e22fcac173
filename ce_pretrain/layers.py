"""Building blocks of the context encoder: the channel-wise fully-connected layer and the up-convolution decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODER_NORMS", "ChannelWiseFC", "UpConvDecoder", "dcgan_init_", "num_upconvs"]

DECODER_NORMS = ("batch", "none")


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation, as in the original code: convolutions (and the fully-connected layers that stand for
    whole-map convolutions) N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ChannelWiseFC(nn.Module):
    """Fully-connected layer within each feature map, none across them (§3.1).

    "If the input layer has m feature maps of size n × n, this layer will output m feature maps of dimension
    n × n. [...] the number of parameters in this channel-wise fully-connected layer is mn⁴, compared to m²n⁴
    parameters in a fully-connected layer (ignoring the bias term)." Feature maps need not be square: the weight
    is ``[m, h·w, h·w]``, plus one bias per output unit.

    Args:
        channels: m, the number of feature maps.
        height: h of each map.
        width: w of each map.
        bias: add a learned bias ``[m, h·w]``.
    """

    def __init__(self, channels: int, height: int, width: int, bias: bool = True):
        super().__init__()
        self.channels, self.height, self.width = channels, height, width
        n = height * width
        bound = 1.0 / math.sqrt(n)  # nn.Linear's default initialisation, per map
        self.weight = nn.Parameter(torch.empty(channels, n, n).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels, 1, n).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, m, h, w]`` → ``[B, m, h, w]``."""
        b, m, h, w = x.shape
        if (m, h, w) != (self.channels, self.height, self.width):
            raise ValueError(
                f"ChannelWiseFC expects feature maps [B, {self.channels}, {self.height}, {self.width}], got "
                f"{list(x.shape)}; the layer is sized for one input resolution"
            )
        x = x.reshape(b, m, h * w).transpose(0, 1)  # [m, B, h·w]: one matmul per map
        y = torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias, x, self.weight)
        return y.transpose(0, 1).reshape(b, m, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}, bias={self.bias is not None}"


def num_upconvs(in_size: int, out_size: int) -> int:
    """Doubling up-convolutions that bring ``in_size`` closest to ``out_size`` (at least one)."""
    return max(1, round(math.log2(out_size / in_size)))


class UpConvDecoder(nn.Module):
    """A series of up-convolutions, each followed by BatchNorm (or nothing) and ReLU, then a 3×3 convolution to
    pixels (§3.1).

    Each up-convolution is a 4×4 transposed convolution of stride 2 (the DCGAN generator's), which doubles the
    resolution; from a 1×1 bottleneck the first one is a 4×4 stride-1 transposed convolution to 4×4 instead,
    computed as the equivalent fully-connected layer (one GEMM, several times faster than the convolution kernels
    on 1×1 inputs).
    "The series of up-convolutions and non-linearities comprises a non-linear weighted upsampling of the feature
    produced by the encoder until we roughly reach the original target size": when the doublings do not land on
    ``out_size`` exactly (AlexNet: 6 → 192 for 227), the last feature map is resized bilinearly before the output
    convolution.

    Args:
        in_channels: channels of the bottleneck.
        in_size: ``(h, w)`` of the bottleneck.
        out_size: ``(H, W)`` of the prediction.
        channels: output channels of each up-convolution; its length is the number of up-convolutions.
        out_channels: channels of the prediction.
        norm: ``"batch"``: BatchNorm after each up-convolution (DCGAN's generator, and the original code's);
            ``"none"``: ReLU alone, as §3.1 describes the decoder, with a bias in each up-convolution instead.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: tuple[int, int],
        out_size: tuple[int, int],
        channels: list[int],
        out_channels: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in DECODER_NORMS:
            raise ValueError(f"norm must be one of {', '.join(DECODER_NORMS)}, got {norm!r}")
        bias = norm == "none"  # a bias before BatchNorm would be cancelled by its mean
        self.out_size = tuple(out_size)
        layers: list[nn.Module] = []
        prev, size = in_channels, tuple(in_size)
        for i, c in enumerate(channels):
            if i == 0 and size == (1, 1):
                layers += [nn.Flatten(1), nn.Linear(prev, c * 16, bias=bias), nn.Unflatten(1, (c, 4, 4))]
                size = (4, 4)
            else:
                layers.append(nn.ConvTranspose2d(prev, c, 4, stride=2, padding=1, bias=bias))
                size = (size[0] * 2, size[1] * 2)
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)] if norm == "batch" else [nn.ReLU(inplace=True)]
            prev = c
        self.upconvs = nn.Sequential(*layers)
        self.upconv_size = size
        self.to_pixels = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, in_channels, h, w]`` → ``[B, out_channels, H, W]``."""
        x = self.upconvs(x)
        if self.upconv_size != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return self.to_pixels(x)
