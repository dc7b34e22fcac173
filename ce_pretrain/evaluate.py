"""The paper's Table 1 protocol (§5.1): inpainting error over the hole of held-out images, with baselines.

Rows, all on the same images and the same masks, at the model's resolution:

* the context encoder (prediction blended into the context);
* constant-mean fill: the hole filled with the model's dataset mean, i.e. exactly what the encoder sees there;
* NN-inpainting with HOG features, and with the context encoder's own features ("NN inpainting is basis for
  [Hays et al.]"): the nearest image of a pool, judged by the *context* alone (the masked query against the pool
  images masked the same way, as in Fig. 8: "none of the methods ever see the center part of any image"), lends
  the same region to fill the query's hole.

Columns: mean L1 and mean L2 error over the hole in % of the pixel range, and PSNR in dB (the mean of the
per-image PSNRs), as computed by :func:`ce_pretrain.inpaint.hole_errors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .inpaint import fill_holes, hole_errors, model_masks
from .model import ContextEncoder

__all__ = [
    "Evaluation",
    "as_unit_float",
    "context_nearest_neighbors",
    "encoder_features",
    "evaluate",
    "hog_cell",
    "hog_features",
    "mean_fill",
    "nearest_neighbors",
    "nn_fill",
]

MODEL, MEAN, NN_HOG, NN_OURS = "context encoder", "mean fill", "NN-inpainting (HOG)", "NN-inpainting (encoder features)"


def mean_fill(images: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The hole filled with a constant colour.

    Args:
        images: ``[B, 3, H, W]``.
        mask: bool ``[B, 1, H, W]``.
        mean: ``[3]``, the fill.

    Returns:
        ``[B, 3, H, W]``.
    """
    return torch.where(mask, mean.view(1, 3, 1, 1).to(images), images)


def hog_cell(image_size: int) -> int:
    """HOG cell side for an image size: 16 cells a side (8 px at the inpainting preset's 128 px), at least 4 px."""
    return max(4, image_size // 16)


def hog_features(images: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """HOG descriptors of the context: the hole is filled with ``mean`` first, so it carries no information.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        mask: bool ``[B, 1, H, W]``.
        mean: ``[3]`` fill of the hole.
        cell: HOG cell side in pixels (9 orientations, 2×2-cell blocks, L2-Hys, as Dalal & Triggs).

    Returns:
        ``[B, D]`` float32.
    """
    from skimage.feature import hog

    gray = mean_fill(images, mask, mean).mean(1).cpu().numpy()  # [B, H, W]
    feats = [hog(g, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), block_norm="L2-Hys",
                 feature_vector=True) for g in gray]
    return torch.from_numpy(np.stack(feats).astype(np.float32))


@torch.no_grad()
def encoder_features(model: ContextEncoder, images: torch.Tensor, mask: torch.Tensor, batch_size: int = 32
                     ) -> torch.Tensor:
    """The encoder's feature map of the masked images, flattened, L2-normalised: ``[B, 3, S, S]`` → ``[B, C·h·w]``.

    Flattened rather than pooled: where things are in the context is what predicts the hole.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        feats = model.encode(images[i: i + batch_size].to(device), mask[i: i + batch_size].to(device))
        out.append(F.normalize(feats.flatten(1).float(), dim=1).cpu())
    return torch.cat(out)


def nearest_neighbors(query: torch.Tensor, pool: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices of the ``k`` nearest pool rows by Euclidean distance: ``[N, D]``, ``[M, D]`` → ``[N, k]``."""
    k = min(k, len(pool))
    return torch.cdist(query.double(), pool.double()).topk(k, dim=1, largest=False).indices


def nn_fill(images: torch.Tensor, mask: torch.Tensor, pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """NN-inpainting: each hole filled with the same region of its neighbour.

    Args:
        images: ``[B, 3, S, S]``.
        mask: bool ``[B, 1, S, S]``.
        pool: ``[M, 3, S, S]`` (already at the model's resolution).
        index: ``[B]`` pool index of each image's neighbour.
    """
    return torch.where(mask, pool[index].to(images), images)


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → floats in [0, 1]; float images pass through."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def context_nearest_neighbors(
    queries: torch.Tensor, pool: torch.Tensor, masks: torch.Tensor,
    describe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: int, chunk: int = 256,
) -> torch.Tensor:
    """The ``k`` pool neighbours of each query, comparing contexts under each query's own mask.

    Args:
        queries: ``[N, 3, S, S]`` (uint8 or floats in [0, 1]).
        pool: ``[M, 3, S, S]``.
        masks: bool ``[N, 1, S, S]``; the pool is masked like the query it is compared with.
        describe: ``(images [B, 3, S, S], masks [B, 1, S, S]) → features [B, D]``.
        k: neighbours per query (at most ``M``).
        chunk: pool images described at once.

    Returns:
        ``[N, k]`` pool indices, nearest first. The pool is described once per distinct mask: once in all for
        centre masks, once per query for random ones.
    """
    distinct, which = torch.unique(masks.flatten(1), dim=0, return_inverse=True)
    out = torch.empty(len(queries), min(k, len(pool)), dtype=torch.long)
    for g, flat in enumerate(distinct):
        members = (which == g).nonzero().flatten()
        mask = flat.view(1, *masks.shape[1:])
        pool_feats = torch.cat([describe(as_unit_float(part), mask.expand(len(part), -1, -1, -1))
                                for part in pool.split(chunk)])
        query_feats = describe(as_unit_float(queries[members]), mask.expand(len(members), -1, -1, -1))
        out[members] = nearest_neighbors(query_feats, pool_feats, k)
    return out


@dataclass
class Evaluation:
    """The Table 1 numbers of one run.

    Attributes:
        rows: method → ``{"l1": %, "l2": %, "psnr": dB}`` (means over the images).
        num_images: held-out images evaluated.
        num_pool: images in the neighbour pool (0: no NN rows).
        mask: mask kind.
        image_size: the model's resolution, at which everything is measured.
        hole_fraction: mean fraction of each image in the hole.
    """

    rows: dict[str, dict[str, float]]
    num_images: int
    num_pool: int
    mask: str
    image_size: int
    hole_fraction: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: infinite PSNRs (perfect fills) become ``None``, which JSON can carry."""
        rows = {name: {k: (v if math.isfinite(v) else None) for k, v in vals.items()}
                for name, vals in self.rows.items()}
        return {"protocol": "Pathak et al. 2016, Table 1: errors over the hole, % of the pixel range; PSNR in dB",
                "metrics": rows, "num_images": self.num_images, "num_pool": self.num_pool, "mask": self.mask,
                "image_size": self.image_size, "hole_fraction": self.hole_fraction, **self.extra}

    def table(self) -> str:
        """The rows as a plain-text table, in the paper's column order."""
        width = max(len(name) for name in self.rows) + 2
        lines = [f"{'Method':<{width}}{'Mean L1 Loss':>14}{'Mean L2 Loss':>14}{'PSNR (dB)':>12}"]
        lines.append("-" * len(lines[0]))
        for name, vals in self.rows.items():
            lines.append(f"{name:<{width}}{vals['l1']:>13.2f}%{vals['l2']:>13.2f}%{vals['psnr']:>12.2f}")
        return "\n".join(lines)


def evaluate(
    model: ContextEncoder,
    images: torch.Tensor,
    pool: torch.Tensor | None = None,
    mask: str = "center",
    seed: int = 0,
    batch_size: int = 32,
) -> Evaluation:
    """Table 1 on held-out images: the model, the constant-mean fill, and (with a pool) the two NN-inpainting rows.

    Args:
        model: the context encoder.
        images: held-out images at the model's resolution, ``[N, 3, S, S]``, uint8 or floats in [0, 1].
        pool: other images for the NN rows, ``[M, 3, S, S]``; ``None`` skips those rows.
        mask: ``"center"`` (the paper's protocol), ``"random-block"`` or ``"random-region"``.
        seed: seeds random masks, so that runs are comparable.
        batch_size: images per forward pass.
    """
    s = model.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
        raise ValueError(f"images must be [N, 3, {s}, {s}], got {list(images.shape)}")
    if pool is not None and (pool.ndim != 4 or tuple(pool.shape[1:]) != (3, s, s) or len(pool) == 0):
        raise ValueError(f"pool must be [M ≥ 1, 3, {s}, {s}], got {list(pool.shape)}")
    generator = torch.Generator().manual_seed(seed)
    masks = model_masks(model, mask, len(images), generator)
    truth = as_unit_float(images)
    mean = model.mean.flatten().cpu()

    fills = {MODEL: fill_holes(model, truth, masks, batch_size).cpu(), MEAN: mean_fill(truth, masks, mean)}
    if pool is not None:
        def ours(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return encoder_features(model, x, m, batch_size)

        def hog(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return hog_features(x, m, mean, cell=hog_cell(s))

        pool_f = as_unit_float(pool)
        fills[NN_HOG] = nn_fill(truth, masks, pool_f, context_nearest_neighbors(images, pool, masks, hog, 1)[:, 0])
        fills[NN_OURS] = nn_fill(truth, masks, pool_f, context_nearest_neighbors(images, pool, masks, ours, 1)[:, 0])

    rows = {}
    for name, filled in fills.items():
        errors = hole_errors(filled, truth, masks)
        rows[name] = {k: float(v.mean()) for k, v in errors.items()}
    return Evaluation(rows=rows, num_images=len(images), num_pool=0 if pool is None else len(pool), mask=mask,
                      image_size=s, hole_fraction=float(masks.float().mean()))
