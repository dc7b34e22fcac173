"""``class_name/*.jpg`` folders: samples, stratified hold-out splits, and the train / test transforms."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ce_pretrain.data import IMAGE_EXTENSIONS, load_rgb

__all__ = ["ImageFolderError", "LabelledImages", "check_classes", "eval_transform", "per_class_subset", "readable",
           "scan", "stratified_split", "train_transform"]

Sample = tuple[Path, int]


class ImageFolderError(ValueError):
    """A folder is missing, empty, or its classes do not match the other split's."""


def scan(root: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """All images under ``root/<class>/`` (recursively), sorted; returns ``(samples, class names)``.

    Args:
        root: a folder with one sub-folder per class.
        classes: the class list to use (a validation folder must have the training folder's classes).

    Raises:
        ImageFolderError: ``root`` is missing, has no class folders or no images, or has a class not in ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image folder {str(root)!r} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ImageFolderError(f"{str(root)!r} has no class sub-folders (expected {root}/<class>/*.jpg)")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ImageFolderError(f"{str(root)!r} has classes the training folder lacks: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(p, index[c]) for c in found for p in sorted((root / c).rglob("*"))
               if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not samples:
        raise ImageFolderError(f"{str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, list(classes)


def readable(samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """``samples`` whose files open as images (the header only: a zero-byte file, an HTML page saved as .jpg),
    and one ``"path: reason"`` line for each file that does not, so a run skips it instead of failing mid-way."""
    good, bad = [], []
    for path, label in samples:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            bad.append(f"{path}: {reason}")
        else:
            good.append((path, label))
    return good, bad


def check_classes(samples: Sequence[Sample], classes: Sequence[str], root: str | os.PathLike) -> None:
    """Refuse training images with fewer than two classes, or a class without any image."""
    if len(classes) < 2:
        raise ImageFolderError(f"{str(root)!r} has one class folder; classification needs at least two")
    empty = sorted(set(range(len(classes))) - {label for _, label in samples})
    if empty:
        names = ", ".join(repr(classes[i]) for i in empty[:5])
        raise ImageFolderError(f"{str(root)!r}: class folder {names} holds no readable images; add some or remove it")


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Carve ``fraction`` of every class out of ``samples``: ``(rest, held_out)``, deterministic in ``seed``.

    Every class with at least two images keeps one on each side, so per-class accuracy is defined.
    """
    if not 0 < fraction < 1:
        raise ImageFolderError(f"hold-out fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        held += items[:n]
        rest += items[n:]
    return sorted(rest), sorted(held)


def per_class_subset(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """At most ``n`` images of every class of ``samples`` (a draw fixed by ``seed``): the few-label regime.

    The draw does not depend on the other classes, and a larger ``n`` keeps the images of a smaller one.
    """
    if n < 1:
        raise ImageFolderError(f"--labels-per-class must be at least 1, got {n}")
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    kept = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        random.Random(f"{seed}/{label}").shuffle(items)
        kept += items[:n]
    return sorted(kept)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Shorter side to ``size / 0.875``, centre crop ``size``: the usual single-crop test."""
    return T.Compose([T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size), T.ToImage(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Random-resized crops (8-100 % of the area) and horizontal flips, for fine-tuning."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


class LabelledImages(torch.utils.data.Dataset):
    """``(image [3, size, size], label)`` pairs of ``samples`` under ``transform``."""

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples])
