"""Frozen-encoder probes: per-stage pooled features, a weighted kNN and a linear classifier, and their metrics.

Features follow the linear-classification protocol of the self-supervised literature (Zhang et al., 2016): each
stage's map is average-pooled to about 9,000 values (``C · g² ≈ 9216``; fewer where the map is smaller than that
grid: at 99 px AlexNet's conv5 gives 6,400 and pool5 1,024), flattened and standardised with the training set's
statistics. The kNN is Wu et al.'s (2018) weighted vote: cosine similarity, the k = 20 nearest training images,
each voting ``exp(sim / 0.07)`` for its class; it runs on the standardised features too (InstDisc and DINO
normalise the raw ones: ``--knn-features raw``), so every stage's channels count alike whatever their scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from transfer.common.features import TimmFeatures

from .data import ImageFolderError

__all__ = ["StageFeatures", "channel_health", "classification_metrics", "extract", "fit_linear", "knn_scores",
           "pool_grid", "select_weight_decay"]

POOLED_VALUES = 9216
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def pool_grid(channels: int, height: int, target: int = POOLED_VALUES) -> int:
    """Side g of the average-pooling grid so that ``channels · g²`` is about ``target``, at most the map's side."""
    return max(1, min(height, round(math.sqrt(target / channels))))


class StageFeatures(nn.Module):
    """Every ``feature_info`` stage of a timm model, each pooled to about 9K values: ``{stage: [B, C · g²]}``."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        info = list(model.feature_info)
        self.names = [tap["module"] for tap in info]
        self.trunk = TimmFeatures(model, list(range(len(info))))
        try:
            with torch.no_grad():
                maps = self.trunk(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as err:  # e.g. AlexNet's pools need at least 63 px
            raise ImageFolderError(f"image size {image_size} is too small for {type(model).__name__}: "
                                   f"{str(err).splitlines()[0]}") from None
        self.channels = [m.shape[1] for m in maps]
        self.grids = [pool_grid(m.shape[1], min(m.shape[2:])) for m in maps]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: normalised images ``[B, 3, H, W]``."""
        maps = self.trunk(x)
        return {n: nn.functional.adaptive_avg_pool2d(m, g).flatten(1)  # [B, C · g²]
                for n, m, g in zip(self.names, maps, self.grids)}


@torch.no_grad()
def extract(model: StageFeatures, loader: torch.utils.data.DataLoader, device: torch.device,
            dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features of every image of ``loader`` (float32, on the CPU) and the labels."""
    model.eval().to(device)
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in model.names}
    labels = []
    for images, y in loader:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images.to(device, non_blocking=True))
        for n, f in out.items():
            feats[n].append(f.float().cpu())  # once per batch, not per step of a training loop
        labels.append(y)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def channel_health(feats: torch.Tensor, channels: int) -> dict:
    """How much of a stage is alive, from its pooled features ``[N, C · g²]`` (before standardisation).

    ``inactive_channels``: the fraction of channels whose response is the same on every image and in every pooled
    cell (after a ReLU: never positive, a dead unit), so that standardisation zeroes it and no probe can use it;
    ``rms``: the root-mean-square activation, whose growth over pretraining shows a stage's scale drifting.
    """
    per_channel = feats.float().reshape(len(feats), channels, -1).transpose(0, 1).reshape(channels, -1)
    spread = per_channel.std(dim=1, correction=0)
    inactive = spread <= 1e-6 * per_channel.abs().amax(dim=1)  # an all-zero channel too (0 ≤ 0)
    return {"inactive_channels": float(inactive.float().mean()), "rms": float(feats.float().pow(2).mean().sqrt())}


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature, with the statistics of ``train`` only."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return [(t - mean) / std for t in (train, *others)]


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[M, classes]``: each of the k most cosine-similar training images votes exp(sim / T)."""
    train = nn.functional.normalize(train, dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk):
        q = nn.functional.normalize(test[start:start + chunk], dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), num_classes, dtype=sim.dtype, device=sim.device)
        scores.append(votes.scatter_add_(1, train_labels.to(idx.device)[idx], (sim / temperature).exp()))
    return torch.cat(scores)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 100,
               init: nn.Linear | None = None) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty on the weights, solved by L-BFGS.

    The problem is convex, so the solution depends on the data and ``weight_decay`` only, not on a learning-rate or
    epoch schedule: the weight decay is the probe's one hyper-parameter. ``max_iter`` L-BFGS iterations reach it
    (to 1e-5) at decays of 1e-2 and above; at 1e-4 and below they stop short, and then ``init`` (a nearby
    solution, e.g. the previous one of a sweep, which it otherwise only speeds up) shapes the fit too. Both are
    fixed (the sweep's order, a cold start for the final fit), so the scores are reproducible.
    """
    layer = nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():
        layer.weight.copy_(init.weight if init is not None else torch.zeros_like(layer.weight))
        layer.bias.copy_(init.bias if init is not None else torch.zeros_like(layer.bias))
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-5, tolerance_change=1e-7)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(layer(x), y) + weight_decay / 2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


def select_weight_decay(x: torch.Tensor, y: torch.Tensor, held_x: torch.Tensor, held_y: torch.Tensor,
                        num_classes: int, grid: Sequence[float] = WEIGHT_DECAYS) -> tuple[float, dict[float, float]]:
    """The weight decay of ``grid`` with the best top-1 on ``held_x`` (a split of the training set).

    Returns the choice and every candidate's held-out top-1 (ties go to the stronger decay).
    """
    accuracy, layer = {}, None
    for wd in sorted(grid, reverse=True):  # strong to weak decay, each fit starting from the previous solution
        layer = fit_linear(x, y, num_classes, wd, init=layer)
        accuracy[wd] = float((layer(held_x).argmax(1) == held_y).float().mean()) * 100
    best = max(sorted(grid, reverse=True), key=lambda wd: accuracy[wd])
    return best, {wd: accuracy[wd] for wd in grid}


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """Top-1 and top-5 accuracy and each class's top-1 accuracy, in percent (top-5 is top-C with C < 5 classes)."""
    scores, labels = scores.float().cpu(), labels.cpu()
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(1)
    per_class = {}
    for i, name in enumerate(classes):
        mask = labels == i
        per_class[name] = float(hit1[mask].float().mean()) * 100 if mask.any() else None
    present = [v for v in per_class.values() if v is not None]
    return {"top1": float(hit1.float().mean()) * 100, "top5": float(hit5.float().mean()) * 100,
            "mean_per_class": sum(present) / len(present), "per_class": per_class, "images": len(labels)}
