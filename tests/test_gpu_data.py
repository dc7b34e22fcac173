"""The pre-decoded cache and device-side crops (run here on the CPU; on a GPU the same code runs on the device)."""

import itertools

import numpy as np
import pytest
import torch

from ce_pretrain.data import EpochSampler, ImageDataset, list_images
from ce_pretrain.gpu_data import CachedCrops, open_cache

SIZE = 32


@pytest.fixture
def cached(image_folder, tmp_path):
    (image_folder / "broken.jpg").write_bytes(b"not an image")
    dataset = ImageDataset(list_images(image_folder), SIZE)
    cache, meta = open_cache(dataset, tmp_path / "cache.npy")
    return dataset, cache, meta


def test_cache_holds_each_readable_image_once_at_load_size(cached, tmp_path):
    dataset, cache, meta = cached
    load = dataset.load_size
    assert cache.shape == (len(dataset) - 1, load, load, 3) and cache.dtype == np.uint8
    assert [n.endswith("broken.jpg") for n in meta["unreadable"]] == [True]
    assert cache.reshape(len(cache), -1).std(1).min() > 0  # real pictures, not zero-filled rows
    # opening again reuses the file; another crop size (so another load size) rebuilds it
    again, _ = open_cache(dataset, tmp_path / "cache.npy")
    assert np.array_equal(np.asarray(again), np.asarray(cache))
    other, meta2 = open_cache(ImageDataset(dataset.items, 48), tmp_path / "cache.npy")
    assert other.shape[1] == meta2["load_size"] != load


def _windows(image: np.ndarray, s: int) -> list[np.ndarray]:
    """Every s×s window of an ``[L, L, 3]`` image, and its mirror, as ``[3, s, s]``."""
    out = []
    for top, left in itertools.product(range(image.shape[0] - s + 1), repeat=2):
        win = image[top: top + s, left: left + s].transpose(2, 0, 1)
        out += [win, win[:, :, ::-1]]
    return out


def test_crops_are_windows_or_mirrors_of_the_cached_images_in_sampler_order(cached):
    _, cache, meta = cached
    crops = CachedCrops(cache, SIZE, batch_size=4, device="cpu", seed=3, unreadable=meta["unreadable"])
    batches = iter(crops)
    first, bad = next(batches)
    assert first.shape == (4, 3, SIZE, SIZE) and first.dtype == torch.uint8
    assert first.is_contiguous(memory_format=torch.channels_last) and len(bad) == 1
    second, bad2 = next(batches)
    assert bad2 == []
    order = [i for _, i in itertools.islice(iter(EpochSampler(len(cache), seed=3)), 8)]
    flips = 0
    for crop, index in zip(torch.cat([first, second]).numpy(), order):
        windows = _windows(np.asarray(cache[index]), SIZE)
        match = [k for k, w in enumerate(windows) if np.array_equal(w, crop)]
        assert match, f"crop of image {index} is no window of it"
        flips += match[0] % 2
    assert 0 < flips < 8, "flips should happen about half the time"


def test_batches_are_a_pure_function_of_seed_and_position(cached):
    _, cache, _ = cached
    run = list(itertools.islice(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=1)), 5))
    resumed = list(itertools.islice(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=1, start=3 * 4)), 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[3:], resumed))
    other = next(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=2)))[0]
    assert not torch.equal(run[0][0], other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crops_on_the_gpu_match_the_cpu_kind(cached):
    _, cache, _ = cached
    crops, _ = next(iter(CachedCrops(cache, SIZE, 4, "cuda", seed=3)))
    assert crops.device.type == "cuda" and crops.shape == (4, 3, SIZE, SIZE)
