"""Context nearest neighbours, the paper's Fig. 8: which hole contents go with this context?

"To evaluate the quality of features, we find nearest neighbors to the masked part of image just by using the
features from the context ... none of the methods ever see the center part of any image, whether a query or
dataset image" (§5.2). Each query's masked image is compared with every pool image masked the same way, in the
context encoder's feature space and, for comparison, with HOG; the figure shows the hole region of the
neighbours next to the query's context and its true hole.
"""

from __future__ import annotations

import torch
from PIL import Image

from .evaluate import as_unit_float, context_nearest_neighbors, encoder_features, hog_cell, hog_features
from .figure import labelled_grid, to_pil
from .inpaint import model_masks
from .model import ContextEncoder

__all__ = ["context_neighbors", "neighbor_grid"]

ENCODER, HOG = "context encoder", "HOG"


def context_neighbors(
    model: ContextEncoder, queries: torch.Tensor, pool: torch.Tensor, mask: str = "center", k: int = 5,
    seed: int = 0, batch_size: int = 32,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The ``k`` nearest pool images of each query, from the context alone.

    Args:
        model: the context encoder.
        queries: ``[N, 3, S, S]`` at the model's resolution (uint8, or floats in [0, 1]).
        pool: ``[M, 3, S, S]``.
        mask: built-in mask kind; the same mask hides the hole of a query and of the pool images it is compared to.
        k: neighbours per query (at most ``M``).
        seed: seeds random masks.
        batch_size: images per forward pass.

    Returns:
        ``({"context encoder": [N, k], "HOG": [N, k]}, masks [N, 1, S, S])``: pool indices, nearest first.
    """
    masks = model_masks(model, mask, len(queries), torch.Generator().manual_seed(seed))
    mean = model.mean.flatten().cpu()
    s = model.image_size
    def ours(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return encoder_features(model, x, m, batch_size)

    def hog(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return hog_features(x, m, mean, cell=hog_cell(s))

    found = {ENCODER: context_nearest_neighbors(queries, pool, masks, ours, k),
             HOG: context_nearest_neighbors(queries, pool, masks, hog, k)}
    return found, masks


def _hole_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the bounding box of a ``[1, H, W]`` mask."""
    rows, cols = mask[0].any(1).nonzero().flatten(), mask[0].any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def neighbor_grid(
    queries: torch.Tensor, pool: torch.Tensor, neighbors: dict[str, torch.Tensor], masks: torch.Tensor,
    fill: torch.Tensor, tile: int = 128,
) -> Image.Image:
    """The Fig. 8 figure: per query, its context, its true hole, then the hole region of each method's neighbours.

    Args:
        queries: ``[N, 3, S, S]``.
        pool: ``[M, 3, S, S]``.
        neighbors: method → ``[N, k]`` pool indices, nearest first.
        masks: bool ``[N, 1, S, S]``.
        fill: ``[3]`` colour shown in the hole of the query.
        tile: side of each tile in pixels.
    """
    q, p = as_unit_float(queries), as_unit_float(pool)
    methods = list(neighbors)
    k = neighbors[methods[0]].shape[1]
    labels, breaks = ["query (context)", "query (hole)"], []
    for method in methods:
        breaks.append(len(labels))
        labels += [f"{method} #{j + 1}" for j in range(k)]
    rows = []
    for i in range(len(q)):
        top, bottom, left, right = _hole_box(masks[i])
        context = torch.where(masks[i], fill.view(3, 1, 1).to(q), q[i])
        row = [to_pil(context), to_pil(q[i, :, top:bottom, left:right])]
        for method in methods:
            row += [to_pil(p[j, :, top:bottom, left:right]) for j in neighbors[method][i].tolist()]
        rows.append(row)
    title = "Context nearest neighbours (Pathak et al. 2016, Fig. 8): hole regions of the pool images whose context " \
            "is closest"
    return labelled_grid(rows, labels, tile=tile, group_breaks=breaks, title=title)
