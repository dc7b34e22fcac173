"""Losses of §3.2: the normalised masked reconstruction loss and the adversarial terms.

The reconstruction loss covers the dropped region and, for the inpainting preset, a band of ``overlap`` pixels of
context around it that the prediction also covers: "we predict a slightly larger patch that overlaps with the
context (by 7px). During training, we use higher weight (10×) for the reconstruction loss in this overlapping
region" (§5.1). Pixels outside that region get exactly zero gradient.

The adversarial terms take discriminator *logits* (binary cross-entropy with logits is the numerically safe form
of the paper's log-likelihood under mixed precision). "We thus use an alternate formulation, by conditioning only
the generator (not the discriminator) on context": the discriminator sees predictions and real patches only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIGH_PASS_SIZE = 7  # px: the local mean that --high-pass-weight removes

__all__ = [
    "ReconstructionLoss",
    "high_pass",
    "discriminator_loss",
    "generator_adversarial_loss",
    "joint_loss",
    "loss_weights",
]


def loss_weights(mask: torch.Tensor, overlap: int = 0, overlap_weight: float = 10.0) -> torch.Tensor:
    """Per-pixel weights of the reconstruction loss.

    Args:
        mask: bool ``[B, 1, H, W]``, True = dropped.
        overlap: width in pixels of the band of context around the hole that the prediction also covers.
        overlap_weight: weight of that band relative to the hole.

    Returns:
        float ``[B, 1, H, W]``: 1 in the hole, ``overlap_weight`` in the band, 0 elsewhere.
    """
    hole = mask.float()
    if overlap <= 0:
        return hole
    # chessboard dilation by `overlap`, as two separable 1-D max-pools
    grown = F.max_pool2d(hole, (1, 2 * overlap + 1), stride=1, padding=(0, overlap))
    grown = F.max_pool2d(grown, (2 * overlap + 1, 1), stride=1, padding=(overlap, 0))
    return hole + (grown - hole) * overlap_weight


def high_pass(x: torch.Tensor, size: int = HIGH_PASS_SIZE) -> torch.Tensor:
    """``x`` minus its ``size``×``size`` local mean (a box blur that averages only pixels inside the image): what
    is left is edges and texture, without the colour and brightness that context already gives away."""
    return x - F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)


class ReconstructionLoss(nn.Module):
    """Normalised masked L2 (or L1) distance, ``‖M̂ ⊙ (x − F((1 − M̂) ⊙ x))‖``, averaged over the loss region.

    "We experimented with both L1 and L2 losses and found no significant difference between them." The sum of
    weighted errors is divided by the number of values inside the loss region (channels × pixels with non-zero
    weight), so an unweighted hole gives the plain mean error over the hole, whatever its size, and the overlap
    band counts ``overlap_weight`` times, as in the original code's weighted MSE.

    With ``high_pass_weight`` w > 0 the error of each pixel gains w times the error of the high-passed images
    (:func:`high_pass` of prediction and target, like MAE's normalised-pixel targets it weighs structure over
    colour); the prediction is still plain pixels.

    Args:
        p: 2 for L2, 1 for L1.
        high_pass_weight: weight w of the high-passed error; 0 (default) is the paper's loss.
    """

    def __init__(self, p: int = 2, high_pass_weight: float = 0.0):
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"p must be 1 (L1) or 2 (L2), got {p}")
        if high_pass_weight < 0:
            raise ValueError(f"high_pass_weight must be at least 0, got {high_pass_weight}")
        self.p = p
        self.high_pass_weight = high_pass_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """pred, target: ``[B, C, H, W]``; weights: ``[B, 1, H, W]`` from :func:`loss_weights` → scalar."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {list(pred.shape)} and target {list(target.shape)} differ in shape")
        region = weights > 0
        diff = pred.float() - target.float()
        err = diff.abs() if self.p == 1 else diff * diff
        if self.high_pass_weight:
            # of the error inside the loss region only, so that pixels outside it still get no gradient
            detail = high_pass(diff * region)
            err = err + self.high_pass_weight * (detail.abs() if self.p == 1 else detail * detail)
        count = region.sum() * pred.shape[1]
        return (err * weights).sum() / count.clamp(min=1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``−[log D(x) + log(1 − D(F(x̂)))]``: real patches labelled 1, predictions 0 (the original ``errD``)."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``−log D(F(x̂))``: the non-saturating generator term, predictions labelled real (the original ``errG``)."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float))


def joint_loss(
    reconstruction: torch.Tensor, adversarial: torch.Tensor, rec_weight: float = 0.999, adv_weight: float = 0.001
) -> torch.Tensor:
    """``L = λrec·Lrec + λadv·Ladv`` with the paper's λrec = 0.999, λadv = 0.001 (§5.1)."""
    return rec_weight * reconstruction + adv_weight * adversarial
