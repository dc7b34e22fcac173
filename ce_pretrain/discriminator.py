"""The adversarial discriminator of §3.2 / §5.1 (the original code's ``netD``), used only by joint-loss runs."""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .layers import dcgan_init_

__all__ = ["Discriminator"]


class Discriminator(nn.Module, PyTorchModelHubMixin, library_name="ce-pretrain", tags=["context-encoder"]):
    """DCGAN discriminator over a predicted (or real) patch, not conditioned on the context.

    4×4 stride-2 convolutions with LeakyReLU(0.2) (BatchNorm from the second on), doubling the channels up to
    ``max_channels``, until the map is at most 4×4; then one convolution over the whole map gives a logit.
    For a 64×64 patch this is exactly the original: 64 → 32 → 16 → 8 → 4 → 1.

    Args:
        image_size: side of the square patches it judges.
        in_chans: channels of the patches.
        width: filters of the first convolution (the original ``ndf``).
        max_channels: cap on the channel doubling.
    """

    def __init__(self, image_size: int = 64, in_chans: int = 3, width: int = 64, max_channels: int = 512):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"the discriminator needs patches of at least 8 px, got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        size, chans = image_size // 2, width
        while size > 4:
            nxt = min(chans * 2, max_channels)
            layers += [nn.Conv2d(chans, nxt, 4, 2, 1, bias=False), nn.BatchNorm2d(nxt), nn.LeakyReLU(0.2, inplace=True)]
            size, chans = size // 2, nxt
        layers.append(nn.Conv2d(chans, 1, size))
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """patches ``[B, C, S, S]`` in the model's normalised space → logits ``[B]``."""
        return self.net(x).flatten()
