"""A pre-decoded image cache for fast epochs: decode and resize once, then crop and flip on the device.

JPEG decoding and resizing cost a CPU core ~3 ms per image, so a GPU that steps 12K images/s would need ~40 loader
processes. ``--data-cache FILE`` decodes every image once into a memory-mapped uint8 array ``[N, L, L, 3]`` (each
image's shorter side resized to the load size L, as :class:`~ce_pretrain.data.ImageDataset` does, then its central
L×L square kept); every later epoch only gathers rows of that array into pinned memory (a background thread), copies
them to the device, and cuts the random S×S crops and flips there from a device generator.

The crops are of the same kind as the loader's: a random S×S window of the resized image, flipped half the time —
drawn from the central square instead of the whole resized image (the part outside it is at most 12 % of the
longer side for 4:3 photographs). With ``--augment rrc`` / ``rrc+jitter`` the boxes of random-resized crops are
drawn within that square and resampled with ``grid_sample``, and the colour jitter runs in float on the device
before the crops are rounded back to uint8 (:func:`ce_pretrain.augment.resized_crops`). Data order follows
:class:`~ce_pretrain.data.EpochSampler`, and the crops of a batch are a pure function of the seed and the batch's
position, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .augment import AUGMENTS, DRAWS, resized_crops
from .data import _BAD_IMAGE, EpochSampler, ImageDataset, resize_shorter

__all__ = ["CachedCrops", "build_cache", "open_cache"]


def _fingerprint(dataset: ImageDataset) -> str:
    names = "\n".join(dataset._name(i) for i in range(len(dataset)))
    return hashlib.blake2b(names.encode(), digest_size=16).hexdigest()


class _Decoded(torch.utils.data.Dataset):
    """Image ``i`` decoded, resized and centre-cropped to ``[L, L, 3]`` uint8 (``None`` when unreadable)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None]:
        size, load = self.dataset.image_size, self.dataset.load_size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = resize_shorter(self.dataset._decode(i), load, size)
        except _BAD_IMAGE:
            return i, None
        w, h = img.size
        left, top = (w - load) // 2, (h - load) // 2
        return i, np.array(img.crop((left, top, left + load, top + load)), dtype=np.uint8)


def build_cache(dataset: ImageDataset, path: str | os.PathLike, num_workers: int = 0) -> Path:
    """Decode every image of ``dataset`` once into ``path`` (``.npy``) and its description ``path.json``.

    Unreadable images are left out and listed in the description. Both files are written under temporary names and
    renamed into place, so a killed build never leaves a cache that looks complete.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load = dataset.load_size
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(dataset), load, load, 3))
    loader = torch.utils.data.DataLoader(_Decoded(dataset), batch_size=None, num_workers=num_workers)
    kept, bad = 0, []
    for i, img in loader:
        if img is None:
            bad.append(dataset._name(i))
            continue
        array[kept] = img
        kept += 1
    if kept == 0:
        tmp.unlink()
        raise ValueError(f"none of the {len(dataset)} images could be read")
    array.flush()
    del array
    if kept < len(dataset):  # shrink the leading dimension to the images kept: rewrite the header in place
        full = np.load(tmp, mmap_mode="r")
        compact = np.lib.format.open_memmap(tmp.with_suffix(".c.npy"), mode="w+", dtype=np.uint8,
                                            shape=(kept, load, load, 3))
        compact[:] = full[:kept]
        compact.flush()
        del full, compact
        os.replace(tmp.with_suffix(".c.npy"), tmp)
    meta = {"images": kept, "load_size": load, "fingerprint": _fingerprint(dataset), "unreadable": bad}
    meta_tmp = tmp.with_suffix(".json")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    os.replace(meta_tmp, path.with_name(path.name + ".json"))
    return path


def open_cache(dataset: ImageDataset, path: str | os.PathLike, num_workers: int = 0) -> tuple[np.ndarray, dict]:
    """The cache of ``dataset`` at ``path`` (memory-mapped) and its description; built first when it is
    missing or was built from other images or another load size."""
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() and path.is_file() else None
    if meta is None or meta["load_size"] != dataset.load_size or meta["fingerprint"] != _fingerprint(dataset):
        build_cache(dataset, path, num_workers)
        meta = json.loads(meta_path.read_text())
    return np.load(path, mmap_mode="c"), meta  # copy-on-write: torch wants writable arrays; the file is never written


class CachedCrops:
    """Endless batches ``(crops, bad)`` of uint8 ``[B, 3, S, S]`` crops on ``device`` (channels-last in memory),
    like a ``DataLoader`` over :class:`~ce_pretrain.data.ImageDataset`; ``bad`` lists the unreadable files once.

    Args:
        cache: ``[N, L, L, 3]`` uint8 (from :func:`open_cache`).
        image_size: crop side S ≤ L.
        batch_size: crops per batch.
        device: where crops are cut.
        seed: order and crop seed.
        rank: this process's index.
        world_size: number of processes.
        start: samples of this process already consumed (a multiple of ``batch_size``).
        unreadable: files left out of the cache, reported with the first batch.
        prefetch: batches gathered ahead by the background thread.
        augment: ``crop`` (windows and flips, as the loader's), ``rrc`` or ``rrc+jitter`` (random-resized crops of
            the cached square, and colour jitter in float on the device: :func:`ce_pretrain.augment.resized_crops`).
    """

    def __init__(self, cache: np.ndarray, image_size: int, batch_size: int, device: torch.device | str,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 unreadable: list[str] | None = None, prefetch: int = 3, augment: str = "crop"):
        if image_size > cache.shape[1]:
            raise ValueError(f"crops of {image_size}px do not fit the cache's {cache.shape[1]}px images")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.augment = augment
        self.cache = torch.from_numpy(cache) if isinstance(cache, np.ndarray) else cache
        self.image_size, self.batch_size, self.device = image_size, batch_size, torch.device(device)
        self.seed, self.rank, self.prefetch = seed, rank, prefetch
        self.sampler = EpochSampler(len(cache), seed=seed, rank=rank, world_size=world_size, start=start)
        self.position = start // batch_size  # batches of this process already consumed
        self.unreadable = list(unreadable or [])

    def _gather(self, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: rows of the memory map into (pinned) host batches, in sampler order."""
        order = iter(self.sampler)
        pin = self.device.type == "cuda"
        while not stop.is_set():
            index = torch.tensor([next(order)[1] for _ in range(self.batch_size)])
            rows = torch.empty((self.batch_size, *self.cache.shape[1:]), dtype=torch.uint8, pin_memory=pin)
            torch.index_select(self.cache, 0, index, out=rows)  # releases the GIL while it copies
            while not stop.is_set():
                try:
                    out.put(rows, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def crop(self, rows: torch.Tensor, position: int) -> torch.Tensor:
        """Random crops and flips of ``rows`` ``[B, L, L, 3]`` (on the device) → uint8 ``[B, 3, S, S]``.

        The draws come from a generator on the device seeded by the batch's position: no host round trip.
        """
        b, load, s = rows.shape[0], rows.shape[1], self.image_size
        gen = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + position * 7919
                                                                + self.rank * 15_485_863) % 2**63)
        if self.augment != "crop":
            draws = torch.rand(b, DRAWS, generator=gen, device=self.device)
            return resized_crops(rows, s, draws, jitter=self.augment == "rrc+jitter")
        draws = torch.rand(b, 3, generator=gen, device=self.device)
        top = (draws[:, 0] * (load - s + 1)).long().clamp(max=load - s)
        left = (draws[:, 1] * (load - s + 1)).long().clamp(max=load - s)
        steps = torch.arange(s, device=self.device)
        rows_idx = top[:, None] + steps  # [B, S]
        cols = left[:, None] + steps
        cols = torch.where((draws[:, 2] < 0.5)[:, None], cols.flip(1), cols)  # horizontal flip
        batch = torch.arange(b, device=self.device)[:, None, None]
        return rows[batch, rows_idx[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B,S,S,3] → [B,3,S,S]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._gather, args=(ready, stop), daemon=True)
        worker.start()
        try:
            while True:
                rows = ready.get().to(self.device, non_blocking=True)
                crops = self.crop(rows, self.position)
                self.position += 1
                bad, self.unreadable = self.unreadable, []
                yield crops, bad
        finally:
            stop.set()
