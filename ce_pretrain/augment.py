"""Pretraining augmentations (``--augment``): the paper's fixed-scale crop, random-resized crops, colour jitter.

* ``crop`` (default, the original code's): the shorter side resized to L = 1.13·S (256 → 227), a random S×S
  window, a horizontal flip half the time.
* ``rrc``: a random-resized crop of the same L-resized image — a box of 20–100 % of its area with an aspect ratio in
  3/4–4/3 (Inception's crop, as in torchvision's ``RandomResizedCrop``) resized to S×S — and the flip. The lower
  bound is 0.2, not torchvision's 0.08, as in MoCo v2 and MAE: the context encoder must still see a whole scene
  around its hole, and boxes of 8 % of a photograph are mostly texture.
* ``rrc+jitter``: ``rrc``, then with probability 0.8 a colour jitter of brightness, contrast and saturation, each by
  a factor in [0.6, 1.4] (MoCo v2's strengths, without its hue jitter), applied in that order. There is no random
  grey-scale: in MoCo it removes a shortcut of matching two views by their colour histograms, which a reconstruction
  objective does not have, and a grey image would only make its target easier.

Both data paths follow the same rules and hand the training loop uint8 crops: the PIL loader (:mod:`ce_pretrain.data`,
draws from a Python ``random.Random`` per ``(seed, epoch, index)``) resizes boxes with PIL and jitters with PIL's
``ImageEnhance`` (as torchvision does for PIL images, rounding to 8 bits after each step); the device path
(:mod:`ce_pretrain.gpu_data`, draws from a device generator per batch) resamples boxes with ``grid_sample`` and
jitters in float on the device (:func:`color_jitter`, torchvision's tensor formulas) before rounding to uint8.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

__all__ = ["AUGMENTS", "DRAWS", "JITTER", "JITTER_P", "RRC_RATIO", "RRC_SCALE", "color_jitter", "jitter_factors",
           "pil_resized_crop", "random_resized_box", "resized_crops"]

AUGMENTS = ("crop", "rrc", "rrc+jitter")
RRC_SCALE = (0.2, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4
JITTER_P = 0.8
_ATTEMPTS = 10  # boxes drawn before falling back to the largest centred one (torchvision's rule)
DRAWS = 2 * _ATTEMPTS + 3 + 4  # uniforms per image on the device: candidate boxes, position, flip, jitter
_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, with torchvision's rounding of red


def random_resized_box(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    """A random-resized-crop box ``(left, top, w, h)`` in pixels (sub-pixel) of a ``width``×``height`` image."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(_ATTEMPTS):
        target = area * rng.uniform(*RRC_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h
    ratio = min(max(width / height, RRC_RATIO[0]), RRC_RATIO[1])
    w, h = (width, width / ratio) if width / height <= ratio else (height * ratio, height)
    return (width - w) / 2, (height - h) / 2, w, h


def jitter_factors(rng: random.Random) -> tuple[float, float, float]:
    """Brightness, contrast and saturation factors of one image (all 1 when the jitter is not applied)."""
    factors = tuple(rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3))
    return factors if rng.random() < JITTER_P else (1.0, 1.0, 1.0)


def pil_resized_crop(img: Image.Image, size: int, rng: random.Random, jitter: bool) -> np.ndarray:
    """Random-resized crop of ``img`` to ``size``², a flip half the time, optionally colour jitter → ``[3, S, S]``."""
    left, top, w, h = random_resized_box(rng, *img.size)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter:  # PIL's enhancers, as torchvision's ColorJitter on PIL images: no torch threads in a loader worker
        brightness, contrast, saturation = jitter_factors(rng)
        img = ImageEnhance.Brightness(img).enhance(brightness)
        img = ImageEnhance.Contrast(img).enhance(contrast)
        img = ImageEnhance.Color(img).enhance(saturation)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def color_jitter(images: torch.Tensor, factors: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Brightness, then contrast, then saturation, as torchvision's ``ColorJitter`` defines each.

    Each is a blend ``f·x + (1 − f)·reference`` clamped to [0, peak], with black, the image's mean grey level and each
    pixel's grey level as references; computed in place on a copy (a few passes over the batch).

    Args:
        images: float ``[B, 3, H, W]`` in [0, peak].
        factors: ``[B, 3]`` brightness, contrast and saturation factors (1 leaves an image unchanged).
        peak: white (1 for [0, 1] images, 255 for pixel values).

    Returns:
        float ``[B, 3, H, W]`` in [0, peak].
    """
    f = factors.to(images.dtype)[:, :, None, None]  # [B, 3, 1, 1]
    x = (images * f[:, 0:1]).clamp_(0, peak)
    means = x.mean((2, 3), keepdim=True)  # [B, 3, 1, 1]; the mean grey level is the luma of the channel means
    mean = means[:, 0:1] * _GREY[0] + means[:, 1:2] * _GREY[1] + means[:, 2:3] * _GREY[2]
    x.mul_(f[:, 1:2]).add_(mean * (1 - f[:, 1:2])).clamp_(0, peak)
    grey = x[:, 0:1] * _GREY[0] + x[:, 1:2] * _GREY[1] + x[:, 2:3] * _GREY[2]  # [B, 1, H, W] (a 1×1 conv is slower)
    return x.mul_(f[:, 2:3]).add_(grey * (1 - f[:, 2:3])).clamp_(0, peak)


def resized_crops(rows: torch.Tensor, size: int, draws: torch.Tensor, jitter: bool) -> torch.Tensor:
    """Random-resized crops (and flips, and jitter) of a batch of square images, on their device.

    The box rule is :func:`random_resized_box`'s, vectorised: ten candidate boxes per image, the first that fits
    is taken, else the whole square. Boxes are resampled bilinearly with ``grid_sample``.

    Args:
        rows: uint8 ``[B, L, L, 3]``.
        size: crop side S.
        draws: uniform ``[B, DRAWS]`` on the device: candidate scales and log-ratios, position, flip,
            then the three jitter factors and whether to apply them.
        jitter: apply the colour jitter.

    Returns:
        uint8 ``[B, 3, S, S]``.
    """
    b = rows.shape[0]
    cand = draws[:, : 2 * _ATTEMPTS].view(b, _ATTEMPTS, 2)
    scale = RRC_SCALE[0] + cand[..., 0] * (RRC_SCALE[1] - RRC_SCALE[0])
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = torch.exp(lo + cand[..., 1] * (hi - lo))
    w, h = torch.sqrt(scale * ratio), torch.sqrt(scale / ratio)  # [B, 10], in units of the side L
    fits = (w <= 1) & (h <= 1)
    found, first = fits.any(1), fits.int().argmax(1, keepdim=True)  # the first box that fits, if any
    w = torch.where(found, w.gather(1, first)[:, 0], 1.0)
    h = torch.where(found, h.gather(1, first)[:, 0], 1.0)
    pos, flip = draws[:, 2 * _ATTEMPTS: 2 * _ATTEMPTS + 2], draws[:, 2 * _ATTEMPTS + 2] < 0.5
    left, top = pos[:, 0] * (1 - w), pos[:, 1] * (1 - h)
    # sampling points in grid_sample's [-1, 1] units (align_corners=False): output pixel centre u ∈ (-1, 1) reads
    # the input at w·u + (2·left + w − 1); the box is axis-aligned, so x depends on the column and y on the row only
    u = (torch.arange(size, device=rows.device) * 2 + 1) / size - 1
    gx = torch.where(flip, -w, w)[:, None] * u + (2 * left + w - 1)[:, None]  # [B, S]
    gy = h[:, None] * u + (2 * top + h - 1)[:, None]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [B, S, S, 2] as (x, y)
    images = rows.permute(0, 3, 1, 2).float()  # [B, L, L, 3] → [B, 3, L, L] (channels-last in memory)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter:
        j = draws[:, 2 * _ATTEMPTS + 3:]
        factors = 1 - JITTER + 2 * JITTER * j[:, :3]
        factors = torch.where((j[:, 3] < JITTER_P)[:, None], factors, torch.ones_like(factors))
        out = color_jitter(out, factors, peak=255.0)
    # bilinear weights and the jitter keep values in [0, 255]: rounding needs no clamp
    return out.round_().to(torch.uint8).contiguous(memory_format=torch.channels_last)
