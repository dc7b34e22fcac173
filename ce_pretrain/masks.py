"""Region masks of §3.3: central square, random blocks, random regions.

Every mask is a boolean tensor ``[B, 1, H, W]``, True where pixels are dropped. All kinds are batched and run on
the requested device; their randomness comes from small parameter tensors drawn from ``generator`` on the
generator's own device, so a seed gives the same masks on CPU and GPU.

Block and region masks cover more than 0 and at most 1/4 of each image ("covering up to 1/4 of the image").
Region masks hit the coverage they draw exactly: the shape is given as a field whose sub-level sets are its
eroded or dilated versions, and the mask keeps the ``round(coverage·H·W)`` lowest pixels of that field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MASK_KINDS", "TRAIN_MASK_KINDS", "MaskRule", "ShapeBank", "make_masks", "mask_coverage"]

MASK_KINDS = ("center", "random-block", "random-region")
# "none": no pixel dropped, the paper's autoencoder baseline (Table 2); the loss then covers the whole image
TRAIN_MASK_KINDS = (*MASK_KINDS, "none")
REGION_SOURCES = ("procedural", "noise")
MAX_COVERAGE = 0.25


def mask_coverage(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of dropped pixels of each mask: ``[B, 1, H, W]`` → ``[B]``."""
    return mask.flatten(1).float().mean(1)


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(*shape, generator=generator, device=device)


def _center(batch: int, height: int, width: int, overlap: int, device: torch.device) -> torch.Tensor:
    """The central square of half the image side, shrunk by ``overlap`` px on each side (§5.1's 7 px band)."""
    side = min(height, width) // 2
    top, left = (height - side) // 2, (width - side) // 2
    inner = side - 2 * overlap
    if inner <= 0:
        raise ValueError(f"overlap={overlap} leaves no hole in a {side}px centre square")
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool, device=device)
    mask[:, :, top + overlap: top + overlap + inner, left + overlap: left + overlap + inner] = True
    return mask


def _random_blocks(
    batch: int, height: int, width: int, generator: torch.Generator | None, device: torch.device,
    max_blocks: int = 9,
) -> torch.Tensor:
    """Several smaller, possibly overlapping squares; a block is kept only while the union stays ≤ 1/4."""
    short = min(height, width)
    lo, hi = max(1, short // 8), max(1, short // 4)  # each block ≤ 1/16 of the image
    wanted = 1 + (_rand(generator, batch) * max_blocks).long().to(device)  # blocks per image
    params = _rand(generator, max_blocks, batch, 3).to(device)
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool, device=device)
    limit = MAX_COVERAGE * height * width
    for k in range(max_blocks):
        size = (lo + params[k, :, 0] * (hi - lo + 1)).long().clamp(max=hi).view(batch, 1, 1, 1)
        top = (params[k, :, 1].view(batch, 1, 1, 1) * (height - size + 1)).long()
        left = (params[k, :, 2].view(batch, 1, 1, 1) * (width - size + 1)).long()
        block = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
        grown = mask | block
        keep = (grown.flatten(1).sum(1) <= limit) & (k < wanted)
        mask = torch.where(keep.view(batch, 1, 1, 1), grown, mask)
    return mask


def _lowest(field: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Keep the ``round(coverage·H·W)`` lowest values of each field ``[B, 1, H, W]`` (at least one pixel)."""
    b, _, h, w = field.shape
    most = int(MAX_COVERAGE * h * w)
    count = (coverage * h * w).round().long().clamp(1, most)
    # a partial sort of the lowest quarter is all that is needed, and gives an exact count even with ties
    order = field.reshape(b, h * w).topk(most, dim=1, largest=False, sorted=True).indices
    keep = torch.arange(most, device=field.device).unsqueeze(0) < count.unsqueeze(1)
    mask = torch.zeros(b, h * w, dtype=torch.bool, device=field.device).scatter_(1, order, keep)
    return mask.view(b, 1, h, w)


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in units of the shorter side, centred on the image: two ``[1, H, W]`` tensors."""
    short = min(height, width)
    ys = (torch.arange(height, device=device) + 0.5 - height / 2) / short * 2
    xs = (torch.arange(width, device=device) + 0.5 - width / 2) / short * 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return gy.unsqueeze(0), gx.unsqueeze(0)


def _random_affine(params: torch.Tensor) -> torch.Tensor:
    """Rotation, anisotropic scale (unit determinant) and shear from 4 uniforms per image → ``[B, 2, 2]``."""
    angle = params[:, 0] * 2 * math.pi
    stretch = torch.exp((params[:, 1] - 0.5) * 1.2)  # aspect ratio in [0.55, 1.8]
    shear = (params[:, 2] - 0.5) * 0.8
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    scale = torch.diag_embed(torch.stack([stretch, 1 / stretch], -1))
    shr = torch.eye(2, device=params.device).repeat(len(params), 1, 1)
    shr[:, 0, 1] = shear
    return rot @ shr @ scale


def _procedural_field(
    batch: int, height: int, width: int, generator: torch.Generator | None, device: torch.device, harmonics: int = 5,
    resolution: int = 64,
) -> torch.Tensor:
    """Star-shaped blobs with a random outline, deformed by a random affine map and placed anywhere.

    The outline is ``r(φ) = 1 + Σₖ aₖ cos(kφ + φₖ)``; the field is the radius normalised by the outline, so its
    sub-level sets are the same shape at every scale. The field is smooth, so it is computed on a grid of at most
    ``resolution`` px a side and upsampled bilinearly.
    """
    p = _rand(generator, batch, 6 + 2 * harmonics).to(device)
    scale = min(1.0, resolution / max(height, width))
    fh, fw = max(4, round(height * scale)), max(4, round(width * scale))
    gy, gx = _pixel_grid(fh, fw, device)
    cy = ((p[:, 0] - 0.5) * 1.6 * height / min(height, width)).view(batch, 1, 1)
    cx = ((p[:, 1] - 0.5) * 1.6 * width / min(height, width)).view(batch, 1, 1)
    a = _random_affine(p[:, 2:6])
    dy, dx = gy - cy, gx - cx
    u = a[:, 0, 0].view(-1, 1, 1) * dx + a[:, 0, 1].view(-1, 1, 1) * dy
    v = a[:, 1, 0].view(-1, 1, 1) * dx + a[:, 1, 1].view(-1, 1, 1) * dy
    radius, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    k = torch.arange(1, harmonics + 1, device=device).view(1, -1, 1, 1)
    amp = (p[:, 6: 6 + harmonics] * 0.6).view(batch, -1, 1, 1) / k
    phase = (p[:, 6 + harmonics:] * 2 * math.pi).view(batch, -1, 1, 1)
    outline = (1 + (amp * torch.cos(k * phi.unsqueeze(1) + phase)).sum(1)).clamp(min=0.15)
    field = (radius / outline).unsqueeze(1)  # [B, 1, fh, fw]
    if (fh, fw) != (height, width):
        field = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
    return field


def _noise_field(
    batch: int, height: int, width: int, generator: torch.Generator | None, device: torch.device,
    cell: float = 1 / 0.06,
) -> torch.Tensor:
    """The original code's random pattern: uniform noise on a grid of ~16.7 px cells, upsampled bicubically
    (``res = 0.06`` in ``train_random.lua``); thresholding it keeps its lowest values."""
    gh, gw = max(2, math.ceil(height / cell)) + 1, max(2, math.ceil(width / cell)) + 1
    low = _rand(generator, batch, 1, gh, gw).to(device)
    # a random sub-cell offset, like the original's random window into one large pattern; the window is taken
    # with device-side indices, so a GPU generator never makes the host wait
    off = _rand(generator, 2).to(device)
    big = F.interpolate(low, scale_factor=cell, mode="bicubic", align_corners=False)
    top = (off[0] * (big.shape[2] - height)).long()
    left = (off[1] * (big.shape[3] - width)).long()
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    return big.index_select(2, rows).index_select(3, cols)


class ShapeBank:
    """Object silhouettes to paste as random regions, e.g. from PASCAL VOC 2012 ``SegmentationObject/``.

    Each shape is stored as a signed distance field on a ``size``×``size`` canvas (positive inside). Pasting
    samples the field through a random affine map with ``grid_sample``; keeping the pixels with the highest field
    values then gives the shape, eroded or dilated to exactly the coverage drawn.

    Args:
        shapes: binary masks ``[K, S, S]``, each a silhouette centred on its canvas.
    """

    def __init__(self, shapes: torch.Tensor):
        if shapes.ndim != 3 or shapes.shape[0] == 0:
            raise ValueError(f"ShapeBank needs binary masks [K, S, S] with K ≥ 1, got {list(shapes.shape)}")
        self.size = shapes.shape[-1]
        self.fields = self._signed_distance(shapes.bool())
        self.areas = shapes.flatten(1).float().mean(1)  # fraction of the canvas
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fields, areas) on ``device``, copied there once rather than on every batch."""
        if device not in self._on_device:
            self._on_device[device] = (self.fields.to(device), self.areas.to(device))
        return self._on_device[device]

    def __len__(self) -> int:
        return len(self.fields)

    @staticmethod
    def _signed_distance(shapes: torch.Tensor) -> torch.Tensor:
        """Chessboard distance to the outline, positive inside, negative outside: ``[K, 1, S, S]`` float."""
        inside = shapes.unsqueeze(1).float()
        field = torch.zeros_like(inside)
        grow, shrink = inside.clone(), inside.clone()
        for _ in range(shapes.shape[-1]):
            shrink = -F.max_pool2d(-shrink, 3, stride=1, padding=1)  # erosion
            grow = F.max_pool2d(grow, 3, stride=1, padding=1)  # dilation
            field += shrink - (1 - grow)
            if not shrink.any() and bool(grow.all()):
                break
        return field + inside * 0.5 - (1 - inside) * 0.5

    @classmethod
    def from_folder(cls, folder: str | Path, size: int = 64, min_pixels: int = 64,
                    limit: int | None = None) -> ShapeBank:
        """Load every object of every PNG/BMP mask in ``folder`` (recursively).

        Each distinct label other than 0 (background) and 255 (void) is one object, as in VOC's
        ``SegmentationObject/`` (instance ids) and ``SegmentationClass/`` (class ids). Objects smaller than
        ``min_pixels`` are skipped; each object is cropped to its box and centred on a ``size``² canvas.
        """
        from PIL import Image, UnidentifiedImageError

        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"mask-shape folder {str(root)!r} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".bmp"))
        shapes: list[torch.Tensor] = []
        for path in files:
            try:
                labels = np.asarray(Image.open(path))
            except (OSError, UnidentifiedImageError):
                continue
            if labels.ndim == 3:  # an RGB rendering: any non-black pixel is foreground
                labels = (labels[..., :3].max(-1) > 0).astype(np.uint8)
            for value in np.unique(labels):
                if value in (0, 255):
                    continue
                obj = labels == value
                if obj.sum() < min_pixels:
                    continue
                shapes.append(cls._to_canvas(obj, size))
                if limit is not None and len(shapes) >= limit:
                    return cls(torch.stack(shapes))
        if not shapes:
            raise ValueError(f"no object masks found in {str(root)!r} (expected PNG label images)")
        return cls(torch.stack(shapes))

    @staticmethod
    def _to_canvas(obj: np.ndarray, size: int) -> torch.Tensor:
        ys, xs = np.nonzero(obj)
        crop = torch.from_numpy(obj[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]).float()
        h, w = crop.shape
        scale = (size - 4) / max(h, w)  # a 2 px margin keeps the outline inside the canvas
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        crop = F.interpolate(crop[None, None], size=(nh, nw), mode="bilinear", align_corners=False)[0, 0] > 0.5
        canvas = torch.zeros(size, size, dtype=torch.bool)
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[top: top + nh, left: left + nw] = crop
        return canvas

    def field(
        self, batch: int, height: int, width: int, coverage: torch.Tensor, generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Randomly chosen shapes, deformed and placed: a field ``[B, 1, H, W]`` whose low values are the shape."""
        p = _rand(generator, batch, 7).to(device)
        fields, areas = self._tensors(torch.device(device))
        idx = (p[:, 0] * len(self)).long().clamp(max=len(self) - 1)
        # canvas side (in units of the image's shorter side) at which the shape covers the drawn fraction
        short = min(height, width)
        side = torch.sqrt(coverage * height * width / areas[idx].clamp(min=1e-3)) / short
        a = _random_affine(p[:, 1:5]) / (side.view(-1, 1, 1) + 1e-6)
        cy = (p[:, 5] - 0.5) * 1.6 * height / short
        cx = (p[:, 6] - 0.5) * 1.6 * width / short
        gy, gx = _pixel_grid(height, width, device)
        dx, dy = gx - cx.view(-1, 1, 1), gy - cy.view(-1, 1, 1)
        # canvas coordinates in [-1, 1] for grid_sample: x first
        u = a[:, 0, 0].view(-1, 1, 1) * dx + a[:, 0, 1].view(-1, 1, 1) * dy
        v = a[:, 1, 0].view(-1, 1, 1) * dx + a[:, 1, 1].view(-1, 1, 1) * dy
        grid = torch.stack([u, v], -1)
        floor = float(self.size)  # below any field value: the outside of the canvas
        sampled = F.grid_sample(fields[idx] + floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return -(sampled - floor)


def make_masks(
    kind: str,
    batch: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    source: str | ShapeBank = "procedural",
    coverage: Sequence[float] = (0.1, MAX_COVERAGE),
    overlap: int = 0,
) -> torch.Tensor:
    """Masks of dropped pixels for a batch.

    Args:
        kind: ``"center"`` (the central square of half the side), ``"random-block"`` (up to nine smaller,
            possibly overlapping squares) or ``"random-region"`` (arbitrary shapes, deformed and pasted anywhere).
        batch: number of masks.
        height: image height.
        width: image width.
        generator: seeds every random choice; drawn on its own device.
        device: where the masks are built (default: the generator's device, else CPU).
        source: for ``"random-region"``: ``"procedural"`` star-shaped blobs, ``"noise"`` (the original code's
            thresholded smooth noise), or a :class:`ShapeBank` of real object silhouettes.
        coverage: ``(low, high)`` range of the dropped fraction for random regions, ``0 < low ≤ high ≤ 1/4``.
        overlap: for ``"center"``, shrink the hole by this many pixels on each side: the prediction of the
            inpainting preset covers the full centre square and so overlaps the context by ``overlap`` px.

    Returns:
        bool ``[B, 1, H, W]``, True = dropped.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if batch < 1 or height < 4 or width < 4:
        raise ValueError(f"masks need batch ≥ 1 and images of at least 4×4 px, got {batch}×{height}×{width}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if kind == "center":
        return _center(batch, height, width, overlap, device)
    if kind == "random-block":
        return _random_blocks(batch, height, width, generator, device)
    low, high = coverage
    if not 0 < low <= high <= MAX_COVERAGE:
        raise ValueError(f"coverage must satisfy 0 < low ≤ high ≤ {MAX_COVERAGE}, got {tuple(coverage)}")
    drawn = (low + _rand(generator, batch) * (high - low)).to(device)
    if isinstance(source, ShapeBank):
        field = source.field(batch, height, width, drawn, generator, device)
    elif source == "procedural":
        field = _procedural_field(batch, height, width, generator, device)
    elif source == "noise":
        field = _noise_field(batch, height, width, generator, device)
    else:
        raise ValueError(f"unknown region source {source!r}; use 'procedural', 'noise' or a ShapeBank")
    return _lowest(field, drawn)


class MaskRule:
    """How a model's masks are drawn and weighted: the one rule shared by training and inference.

    The kind and the overlap come from the model's config (``ContextEncoder(mask=..., overlap=...)``), so a model
    loaded from the Hub draws the masks it was trained with. The overlap applies only to central holes of a model
    that predicts the central square (the inpainting preset's 7 px band of context around the hole); the loss
    weighs that band ``overlap_weight`` times.

    Args:
        kind: one of :data:`TRAIN_MASK_KINDS`.
        image_size: side of the square images.
        overlap: px of context around a central hole covered by the prediction (0 for full-image predictions).
        source: random-region shapes (``"procedural"``, ``"noise"`` or a :class:`ShapeBank`).
        overlap_weight: weight of the overlap band in the reconstruction loss (§5.1: 10).
    """

    def __init__(self, kind: str, image_size: int, overlap: int = 0, source: str | ShapeBank = "procedural",
                 overlap_weight: float = 10.0):
        if kind not in TRAIN_MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(TRAIN_MASK_KINDS)}")
        self.kind, self.image_size, self.source, self.overlap_weight = kind, image_size, source, overlap_weight
        self.overlap = overlap

    def sample(self, batch: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, kind: str | None = None) -> torch.Tensor:
        """Masks for a batch, bool ``[B, 1, S, S]`` (True = dropped); ``kind`` overrides the rule's kind."""
        kind = kind or self.kind
        s = self.image_size
        if kind == "none":
            if device is None:
                device = generator.device if generator is not None else "cpu"
            return torch.zeros(batch, 1, s, s, dtype=torch.bool, device=device)
        return make_masks(kind, batch, s, s, generator=generator, device=device, source=self.source,
                          overlap=self.overlap if kind == "center" else 0)

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction weights ``[B, 1, H, W]``: the hole (and its overlap band), or everything for
        the autoencoder (``"none"``)."""
        from .losses import loss_weights

        if self.kind == "none":
            return torch.ones_like(mask, dtype=torch.float)
        return loss_weights(mask, self.overlap, self.overlap_weight)

    def __repr__(self) -> str:
        return f"MaskRule(kind={self.kind!r}, image_size={self.image_size}, overlap={self.overlap})"
