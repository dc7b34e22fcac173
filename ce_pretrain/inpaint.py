"""Inference on user images: read any image, fill its hole at the model's resolution, paste back at full resolution.

The model sees the whole image resized to ``image_size``² (no crop, so every pixel of the hole is covered); the
prediction is blended into the untouched context, so only pixels of the hole ever change, and the filled image is
pasted back into the original at its own resolution. Also the metrics of the paper's Table 1 (§5.1): mean L1 and
mean L2 error over the hole in % of the pixel range, and PSNR in dB.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
from .data import DataSourceError, ImageReadError, load_rgb
from .data import list_images as _list_images
from .masks import MASK_KINDS
from .model import ContextEncoder

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "InpaintResult",
    "fill_holes",
    "hole_errors",
    "inpaint",
    "list_images",
    "load_folder",
    "load_image",
    "load_mask",
    "model_masks",
    "resize",
]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file of any mode (grayscale, RGBA, CMYK, palette, 16-bit) as RGB floats ``[3, H, W]`` in [0, 1].

    Raises:
        ImageReadError: the file is missing or not a readable image.
    """
    array = np.asarray(load_rgb(path), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """Read a mask image: white (any non-black) pixels are the hole. Returns bool ``[1, H, W]``, True = dropped.

    Args:
        path: any image file; colour masks count a pixel as hole if any channel is non-zero.
        size: ``(H, W)`` the mask must have (that of the image it applies to).

    Raises:
        ImageReadError: unreadable, of another size than ``size``, or with no hole at all.
    """
    mask = torch.from_numpy(np.asarray(load_rgb(path)).max(axis=-1) > 127).unsqueeze(0)
    if tuple(mask.shape[-2:]) != tuple(size):
        raise ImageReadError(f"mask {str(path)!r} is {mask.shape[-1]}×{mask.shape[-2]} px but the image is "
                             f"{size[1]}×{size[0]} px; they must be the same size")
    if not mask.any():
        raise ImageReadError(f"mask {str(path)!r} has no hole (no white pixels)")
    return mask


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix), sorted.

    Raises:
        ImageReadError: the folder does not exist or holds no images.
    """
    try:
        return _list_images(folder)
    except DataSourceError as e:
        raise ImageReadError(str(e)) from e


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize ``[B, 3, H, W]`` → ``[B, 3, h, w]``, antialiased when shrinking; identity at the same size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink).clamp(0, 1)


def load_folder(folder: str | os.PathLike, size: int, limit: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """Every image of a folder (the first ``limit``), resized to ``size``²: uint8 ``[N, 3, size, size]`` and paths.

    Kept as uint8: a quarter of the memory of floats, for evaluation sets of thousands of images.
    """
    files = list_images(folder)[:limit]
    images = [(resize(load_image(p)[None], size)[0] * 255).round().to(torch.uint8) for p in files]
    return torch.stack(images), files


def model_masks(
    model: ContextEncoder, kind: str, batch: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Masks of a built-in kind at the model's resolution, drawn by the model's own :attr:`~ContextEncoder.mask_rule`
    (a central hole keeps the overlap band the inpainting preset was trained with): bool ``[B, 1, S, S]``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)} or a mask image")
    return model.mask_rule.sample(batch, generator, kind=kind)


def _check_hole_inside_prediction(model: ContextEncoder, mask: torch.Tensor) -> None:
    if model.pred_size == model.image_size:
        return
    top, left, h, w = model.pred_box
    outside = mask.clone()
    outside[..., top: top + h, left: left + w] = False
    if outside.any():
        raise ValueError(f"this model predicts only the central {h}×{w} px of its {model.image_size}² input; the "
                         "hole must lie inside that square (use --mask center)")


@torch.no_grad()
def fill_holes(model: ContextEncoder, images: torch.Tensor, mask: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Predict the dropped pixels and blend them into the context: only pixels where ``mask`` is True change.

    Args:
        model: the context encoder (put in eval mode here).
        images: ``[B, 3, S, S]`` in [0, 1] at the model's resolution.
        mask: bool ``[B, 1, S, S]``, True = dropped.
        batch_size: images per forward pass.

    Returns:
        ``[B, 3, S, S]`` in [0, 1].
    """
    _check_hole_inside_prediction(model, mask)
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x, m = images[i: i + batch_size].to(device), mask[i: i + batch_size].to(device)
        out.append(model.paste(model(x, m).clamp(0, 1), x, m).to(images.device))
    return torch.cat(out)


@dataclass
class InpaintResult:
    """One inpainted image at its own resolution: each a ``[3, H, W]`` float tensor in [0, 1] (mask ``[1, H, W]``).

    Attributes:
        image: the input.
        mask: the hole, True = dropped.
        masked: the input with the hole filled with the model's dataset mean (what the model sees).
        result: the input with the hole filled by the model.
    """

    image: torch.Tensor
    mask: torch.Tensor
    masked: torch.Tensor
    result: torch.Tensor


def inpaint(
    model: ContextEncoder,
    image: torch.Tensor,
    mask: torch.Tensor | str = "center",
    generator: torch.Generator | None = None,
) -> InpaintResult:
    """Fill the hole of one image of any size.

    The image is resized to the model's resolution; a mask image is shrunk so that a model pixel is a hole if any
    of its pixels is (the model never sees hole pixels), a built-in mask is drawn at the model's resolution and
    enlarged (nearest). The filled image is enlarged back and pasted into the hole only: outside the hole the
    result is the input, bit for bit.

    Args:
        model: the context encoder.
        image: ``[3, H, W]`` in [0, 1].
        mask: bool ``[1, H, W]`` (True = dropped) or a built-in kind (``"center"``, ``"random-block"``,
            ``"random-region"``).
        generator: seeds random masks.
    """
    size = tuple(image.shape[-2:])
    s = model.image_size
    if isinstance(mask, str):
        small_mask = model_masks(model, mask, 1, generator)
        full_mask = F.interpolate(small_mask.float(), size=size, mode="nearest")[0] > 0.5
    else:
        if tuple(mask.shape) != (1, *size):
            raise ValueError(f"mask must be [1, H, W] = {[1, *size]}, got {list(mask.shape)}")
        full_mask = mask.bool()
        # a pixel of the model's grid is a hole if any source pixel under it is, so the model never sees the hole
        # (adaptive average pooling: every model pixel's window covers the source pixels under it, at any ratio)
        small_mask = F.interpolate(full_mask[None].float(), size=(s, s), mode="area") > 0
    small = resize(image[None], s)
    filled = fill_holes(model, small, small_mask)
    back = resize(filled, size)[0]
    result = torch.where(full_mask, back, image)
    masked = torch.where(full_mask, model.mean.view(3, 1, 1).to(image), image)
    return InpaintResult(image=image, mask=full_mask, masked=masked, result=result)


def hole_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image errors over the hole, as in Table 1 of the paper.

    Args:
        pred: ``[B, 3, H, W]`` in [0, 1].
        target: ``[B, 3, H, W]`` in [0, 1].
        mask: bool ``[B, 1, H, W]``, True = the hole (the only pixels counted).

    Returns:
        ``{"l1": [B], "l2": [B], "psnr": [B]}``: mean absolute error and mean squared error over the hole's pixels
        and channels in % of the pixel range (so an L2 of 1 % is a mean squared error of 0.01 for pixels in
        [0, 1]), and ``10·log10(1 / mse)`` in dB (``inf`` for a perfect fill).
    """
    if pred.shape != target.shape or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"pred {list(pred.shape)}, target {list(target.shape)} and mask {list(mask.shape)} disagree")
    weight = mask.expand_as(pred).to(pred.dtype)
    count = weight.flatten(1).sum(1)
    if (count == 0).any():
        raise ValueError("every mask needs at least one dropped pixel")
    diff = (pred.double() - target.double()) * weight
    mae = diff.abs().flatten(1).sum(1) / count
    mse = diff.square().flatten(1).sum(1) / count
    psnr = torch.where(mse > 0, -10 * torch.log10(mse.clamp(min=1e-30)), torch.full_like(mse, math.inf))
    return {"l1": 100 * mae, "l2": 100 * mse, "psnr": psnr}
