"""Training images as uint8 crops: the image reader, folder and Hugging Face datasets, and their samplers.

Where the images come from (``--data``: a folder, a saved or Hub dataset, the built-in sample) is resolved by
:mod:`ce_pretrain.sources`.

Every source yields uint8 crops ``[3, S, S]``; the training script turns them into floats on the device (a quarter
of the bytes to move). Augmentation randomness is a pure function of ``(seed, epoch, index)``, so a resumed run sees
exactly the crops an uninterrupted one would, whatever the number of loader workers.

Bad files never stop a run: an unreadable, truncated, empty or non-image file is replaced by the next good image
of the dataset and reported (the caller counts them); grayscale, RGBA, CMYK, palette and 16-bit images are
converted to RGB, and images smaller than the crop are upscaled.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .augment import AUGMENTS, pil_resized_crop

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSourceError",
    "EpochSampler",
    "ImageDataset",
    "ImageReadError",
    "StreamingImageDataset",
    "augmented_crop",
    "collate",
    "list_images",
    "load_rgb",
    "random_crop",
    "resize_shorter",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm")
class DataSourceError(ValueError):
    """The data source is missing, empty or unreadable as a whole."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder``, recursively, sorted (so every process sees the same order)."""
    root = Path(folder)
    if not root.exists():
        raise DataSourceError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataSourceError(f"--data {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataSourceError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; 16-bit and float images are rescaled rather than clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent shows as white, as in viewers
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


class ImageReadError(ValueError):
    """An image file is missing, unreadable or unusable; the message is one line naming the file."""


def load_rgb(source: str | os.PathLike | Image.Image, min_side: int | None = None) -> Image.Image:
    """Open an image file of any mode (grayscale, RGBA, CMYK, palette, 16-bit), or take a PIL image, as 8-bit RGB.

    The one image reader of ce-pretrain: training data, inference, evaluation and the demo all read through it.

    Args:
        source: a path or a PIL image.
        min_side: when given, large JPEGs are decoded at reduced scale, but never below this shorter side.

    Raises:
        ImageReadError: one line: no such file, a folder, or not a readable image.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    try:
        with Image.open(source) as img:
            if min_side is not None and img.format == "JPEG":
                scale = min(img.size) / min_side
                if scale >= 2:  # DCT-domain downscaling: much faster decodes of large photos
                    img.draft("RGB", (math.ceil(img.size[0] / scale), math.ceil(img.size[1] / scale)))
            img.load()
            return _to_rgb(img)
    except FileNotFoundError as e:
        raise ImageReadError(f"no such file: {str(source)!r}") from e
    except IsADirectoryError as e:
        raise ImageReadError(f"{str(source)!r} is a folder, not an image") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(f"cannot read image {str(source)!r}: {reason}") from e


def resize_shorter(img: Image.Image, load_size: int, size: int) -> Image.Image:
    """Scale so the shorter side is ``load_size`` and neither side is below ``size`` (small images grow)."""
    w, h = img.size
    scale = load_size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)


def random_crop(img: Image.Image, size: int, load_size: int, rng: random.Random, flip: bool = True) -> np.ndarray:
    """Resize the shorter side to ``load_size`` (≥ ``size``; upscaling small images), random-crop ``size``², flip.

    Returns:
        uint8 ``[3, size, size]``.
    """
    img = resize_shorter(img, load_size, size)
    nw, nh = img.size
    left, top = rng.randint(0, nw - size), rng.randint(0, nh - size)
    img = img.crop((left, top, left + size, top + size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def augmented_crop(img: Image.Image, size: int, load_size: int, rng: random.Random, augment: str = "crop"
                   ) -> np.ndarray:
    """One training crop of ``img`` by the ``--augment`` rule (:mod:`ce_pretrain.augment`) → uint8 ``[3, S, S]``.

    Every rule starts from the image resized to the shorter side ``load_size`` (what ``--data-cache`` stores).
    """
    if augment == "crop":
        return random_crop(img, size, load_size, rng)
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    return pil_resized_crop(resize_shorter(img, load_size, size), size, rng, jitter=augment == "rrc+jitter")


def _sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class ImageDataset(torch.utils.data.Dataset):
    """Random crops of a list of images (files, or rows of a map-style Hugging Face dataset).

    Indexed by ``(epoch, index)`` pairs from :class:`EpochSampler`; returns ``(crop, bad)`` where ``crop`` is
    uint8 ``[3, S, S]`` and ``bad`` lists the items that failed to load and were replaced by the next ones.

    Args:
        items: file paths, or a ``datasets.Dataset``.
        image_size: crop side S.
        load_size: shorter side before cropping (default ``round(1.13·S)``, the 256 → 227 ratio).
        seed: augmentation seed.
        image_column: column of a Hugging Face dataset holding the images.
        cache: keep the decoded, resized images in memory (for small sets such as the demo photographs).
        augment: ``crop``, ``rrc`` or ``rrc+jitter`` (:mod:`ce_pretrain.augment`).
    """

    def __init__(self, items, image_size: int, load_size: int | None = None, seed: int = 0,
                 image_column: str | None = None, cache: bool = False, augment: str = "crop"):
        self.items = items
        self.image_size = image_size
        self.load_size = max(image_size, load_size or round(image_size * 256 / 227))
        self.seed = seed
        self.image_column = image_column
        self.augment = augment
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _name(self, index: int) -> str:
        return str(self.items[index]) if self.image_column is None else f"row {index}"

    def _open(self, index: int) -> Image.Image:
        if self._cache is not None:
            if index not in self._cache:
                self._cache[index] = resize_shorter(self._decode(index), self.load_size, self.image_size)
            return self._cache[index]
        return self._decode(index)

    def _decode(self, index: int) -> Image.Image:
        if self.image_column is None:
            return load_rgb(self.items[index], min_side=self.load_size)
        return _decode_value(self.items[index][self.image_column], self.load_size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
        epoch, index = key
        bad: list[str] = []
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter on odd files
                    img = self._open(i)
            except _BAD_IMAGE:
                bad.append(self._name(i))
                continue
            rng = _sample_rng(self.seed, epoch, index)
            return augmented_crop(img, self.image_size, self.load_size, rng, self.augment), bad
        raise DataSourceError(f"none of the {len(self)} images could be read")


def _decode_value(value, load_size: int) -> Image.Image:
    """An image cell of a Hugging Face dataset (PIL image, ``{"bytes"|"path"}`` dict, or path) → RGB."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io

        return load_rgb(Image.open(io.BytesIO(value["bytes"])))
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    return load_rgb(value) if isinstance(value, Image.Image) else load_rgb(value, min_side=load_size)


_BAD_IMAGE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Random crops from a streamed Hugging Face dataset (``--streaming``), for sets too large to download first.

    Each epoch reshuffles the stream with a buffer (seeded), each process reads its own shard, and a resumed run
    skips the ``start`` good examples this process already used, so it continues exactly where it stopped.
    Yields ``(crop, bad)`` like :class:`ImageDataset`; undecodable examples are skipped and reported with the next
    crop. Use it with at most one loader worker (the position in a stream is sequential).

    Args:
        stream: a ``datasets.IterableDataset``.
        image_size: crop side.
        image_column: the column holding the images.
        seed: shuffling and augmentation seed.
        rank: this process's index.
        world_size: number of processes.
        start: good examples of this process already consumed.
        buffer_size: shuffle buffer.
        augment: ``crop``, ``rrc`` or ``rrc+jitter`` (:mod:`ce_pretrain.augment`).
    """

    def __init__(self, stream, image_size: int, image_column: str, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0, buffer_size: int = 10_000, augment: str = "crop"):
        super().__init__()
        self.augment = augment
        self.stream, self.image_size, self.image_column = stream, image_size, image_column
        self.load_size = round(image_size * 256 / 227)
        self.seed, self.rank, self.world_size, self.start, self.buffer_size = seed, rank, world_size, start, buffer_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(self.stream, rank=self.rank, world_size=self.world_size)
        good, epoch, bad = 0, 0, []
        while True:
            seen = 0
            shuffled = shard.shuffle(seed=self.seed * 100_003 + epoch, buffer_size=self.buffer_size)
            for row, example in enumerate(shuffled):
                seen += 1
                if good < self.start:  # resuming: skip what was used, without decoding it
                    good += 1
                    continue
                try:
                    img = _decode_value(example[self.image_column], self.load_size)
                except _BAD_IMAGE:
                    bad.append(f"epoch {epoch} row {row}")
                    continue
                rng = _sample_rng(self.seed, epoch, good)
                yield augmented_crop(img, self.image_size, self.load_size, rng, self.augment), bad
                good, bad = good + 1, []
            if seen == 0:
                raise DataSourceError("the streamed dataset yielded no examples")
            epoch += 1


def collate(batch: Sequence[tuple[np.ndarray, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """``[(crop, bad), ...]`` → uint8 ``[B, 3, S, S]`` and the names of the files that were skipped."""
    crops = torch.from_numpy(np.stack([b[0] for b in batch]))
    return crops, [name for b in batch for name in b[1]]


class EpochSampler(torch.utils.data.Sampler):
    """Endless ``(epoch, index)`` stream: a fresh permutation per epoch (seeded), sharded across processes.

    Position ``start`` (in samples of this process) lets a resumed run continue exactly where it stopped.

    Args:
        size: dataset length.
        seed: shuffling seed.
        rank: this process's index.
        world_size: number of processes.
        start: samples of this process already consumed.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_rank = math.ceil(size / world_size)

    def _epoch(self, epoch: int) -> list[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        order += order[: self.per_rank * self.world_size - self.size]  # pad so every rank gets as many
        return order[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for index in self._epoch(epoch)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0
