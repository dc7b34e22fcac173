"""Labelled image grids (inpainting results, Fig. 8 neighbours) and atomic PNG writing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import write_atomic

__all__ = ["labelled_grid", "save_png", "save_sample_grid", "to_pil"]

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` floats in [0, 1] → an 8-bit RGB image (rounded, so 8-bit inputs come back bit-exact)."""
    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG through a temporary file and ``os.replace``: readers never see a half-written file."""
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _fit(image: Image.Image, tile: int) -> Image.Image:
    """Scale to fit a ``tile``² box, keeping the aspect ratio, centred on the background."""
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # nearest for upscaling keeps pixels crisp (small holes stay visible); area-like filter for downscaling
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    box = Image.new("RGB", (tile, tile), BACKGROUND)
    box.paste(image.resize(size, resample), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return box


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_centered(draw: ImageDraw.ImageDraw, text: str, cx: float, cy: float, font, width: int) -> None:
    # elide the middle of labels that would spill into a neighbour: file names differ most at their ends
    full, cut = text, 0
    while text and draw.textlength(text, font=font) > width:
        cut += 1
        head, tail = full[: (len(full) - cut) // 2], full[len(full) - (len(full) - cut + 1) // 2:]
        text = head + "…" + tail if len(full) - cut > 1 else ""
    draw.text((cx, cy), text, fill=INK, font=font, anchor="mm")


def labelled_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    column_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    tile: int = 160,
    group_breaks: Sequence[int] = (),
    title: str | None = None,
) -> Image.Image:
    """Tiles in rows and columns with a header label above each column (and optionally one left of each row).

    Args:
        rows: ``rows[i][j]`` is the tile of row ``i``, column ``j`` (``None`` leaves it blank); any sizes, each is
            fitted into a ``tile``² box.
        column_labels: one label per column.
        row_labels: one label per row, or ``None`` for no label column.
        tile: side of each box in pixels.
        group_breaks: column indices before which a wider gap separates groups (e.g. one method from another).
        title: a line above the header.
    """
    n_cols = len(column_labels)
    if any(len(r) != n_cols for r in rows):
        raise ValueError(f"every row needs {n_cols} tiles, one per column label")
    pad, group_pad = 4, 16
    font_size = max(10, tile // 12)
    font = _font(font_size)
    label_h = font_size + 8
    title_h = label_h if title else 0
    row_label_w = tile // 2 + 24 if row_labels else 0
    xs, x = [], row_label_w + pad
    for j in range(n_cols):
        x += group_pad if j in group_breaks else 0
        xs.append(x)
        x += tile + pad
    width, height = x, title_h + label_h + len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_centered(draw, title, width / 2, title_h / 2 + 2, font, width - 2 * pad)
    for j, label in enumerate(column_labels):
        _draw_centered(draw, label, xs[j] + tile / 2, title_h + label_h / 2, font, tile)
    for i, row in enumerate(rows):
        y = title_h + label_h + i * (tile + pad)
        if row_labels:
            _draw_centered(draw, row_labels[i], row_label_w / 2 + pad, y + tile / 2, font, row_label_w - pad)
        for j, image in enumerate(row):
            if image is not None:
                canvas.paste(_fit(image, tile), (xs[j], y))
    return canvas


def save_sample_grid(model, images: torch.Tensor, mask: torch.Tensor, path: str | os.PathLike) -> Path:
    """Training samples: rows of (masked input | prediction blended into the context | original), written atomically.

    Args:
        model: a :class:`~ce_pretrain.ContextEncoder` (put in eval mode for the prediction, then restored).
        images: ``[B, 3, H, W]`` in [0, 1].
        mask: bool ``[B, 1, H, W]``; an empty mask (the autoencoder) shows the whole reconstruction.
        path: the PNG to write.
    """
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(images, mask).float()
        filled = model.paste(pred.clamp(0, 1), images, mask if mask.any() else None)
    model.train(was_training)
    masked = torch.where(mask, model.mean.to(images.dtype), images)
    rows = torch.stack([masked, filled, images], 1).flatten(0, 1)  # [3B, 3, H, W]: triplets side by side
    grid = make_grid(rows.clamp(0, 1).cpu(), nrow=6 if len(images) > 1 else 3, padding=2, pad_value=1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_png(to_pil(grid), path)
