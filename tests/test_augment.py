"""``--augment``: random-resized crops and colour jitter on the PIL loader and on the device path (here the CPU)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ce_pretrain.augment import DRAWS, RRC_RATIO, RRC_SCALE, color_jitter, random_resized_box, resized_crops
from ce_pretrain.data import ImageDataset, list_images
from ce_pretrain.gpu_data import CachedCrops, open_cache

SIZE = 32


@pytest.mark.parametrize("width,height", [(120, 90), (90, 120), (64, 64)])
def test_random_resized_boxes_keep_to_their_scale_and_aspect_ranges(width, height):
    rng = random.Random(0)
    for _ in range(300):
        left, top, w, h = random_resized_box(rng, width, height)
        assert 0 <= left and left + w <= width + 1e-9 and 0 <= top and top + h <= height + 1e-9
        assert RRC_SCALE[0] - 1e-9 <= w * h / (width * height) <= 1 + 1e-9
        assert RRC_RATIO[0] - 1e-9 <= w / h <= RRC_RATIO[1] + 1e-9


def test_a_strip_too_thin_for_any_box_falls_back_to_its_largest_centred_box():
    left, top, w, h = random_resized_box(random.Random(0), 400, 10)
    assert (w, h) == pytest.approx((10 * RRC_RATIO[1], 10)) and left == pytest.approx((400 - w) / 2) and top == 0


def test_color_jitter_matches_torchvision_brightness_contrast_saturation():
    images = torch.rand(4, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[1.3, 0.7, 1.4], [0.6, 1.4, 0.6], [1.0, 1.0, 1.0], [1.2, 1.1, 0.0]])
    expected = []
    for img, (b, c, s) in zip(images, factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
        expected.append(ref)
    got = color_jitter(images, factors)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    assert torch.equal(got[2], images[2])  # factors of 1: unchanged
    assert torch.allclose(got[3][0], got[3][1]) and torch.allclose(got[3][1], got[3][2])  # saturation 0: grey
    torch.testing.assert_close(color_jitter(images * 255, factors, peak=255.0), got * 255, atol=1e-3, rtol=0)


@pytest.fixture
def files(image_folder):
    return list_images(image_folder)


def test_loader_rrc_crops_differ_from_plain_crops_and_are_reproducible(files):
    plain, rrc = ImageDataset(files, SIZE, seed=1), ImageDataset(files, SIZE, seed=1, augment="rrc")
    cached = ImageDataset(files, SIZE, seed=1, augment="rrc", cache=True)
    for key in [(0, 0), (0, 5), (2, 5)]:
        a, b = plain[key][0], rrc[key][0]
        assert b.shape == a.shape == (3, SIZE, SIZE) and b.dtype == np.uint8
        assert not np.array_equal(a, b)
        assert np.array_equal(b, rrc[key][0]) and np.array_equal(b, cached[key][0])  # a function of (seed, epoch, i)
    assert not np.array_equal(rrc[(0, 5)][0], rrc[(2, 5)][0])  # another epoch, another box


def test_loader_jitter_changes_colours_not_geometry(files):
    rrc = ImageDataset(files, SIZE, seed=3, augment="rrc")
    jit = ImageDataset(files, SIZE, seed=3, augment="rrc+jitter")
    changed = 0
    for i in range(len(files)):
        a, b = rrc[(0, i)][0], jit[(0, i)][0]
        assert b.shape == a.shape and b.dtype == np.uint8
        changed += not np.array_equal(a, b)
        # the same box and flip: the two crops' edges (luma gradients) line up
        ga = np.diff(a.astype(float).mean(0), axis=1).ravel()
        gb = np.diff(b.astype(float).mean(0), axis=1).ravel()
        assert np.corrcoef(ga, gb)[0, 1] > 0.5
    assert changed >= len(files) // 2  # the jitter applies with probability 0.8


@pytest.fixture
def cache(image_folder, tmp_path):
    dataset = ImageDataset(list_images(image_folder), SIZE)
    return open_cache(dataset, tmp_path / "cache.npy")[0]


def test_device_rrc_of_the_whole_square_is_the_image_or_its_mirror():
    rows = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    draws = torch.full((2, DRAWS), 0.9)
    draws[:, 0:20:2] = 1.0  # every candidate box covers the whole area ...
    draws[:, 1:20:2] = 0.5  # ... with aspect ratio 1 (the middle of a symmetric log range)
    draws[1, 22] = 0.1  # the second image flipped
    out = resized_crops(rows, SIZE, draws, jitter=False)
    assert torch.equal(out[0], rows[0].permute(2, 0, 1))
    assert torch.equal(out[1], rows[1].permute(2, 0, 1).flip(2))


def test_device_rrc_batches_have_the_crop_shape_and_are_a_pure_function_of_position(cache):
    plain = next(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=1)))[0]
    run = list(itertools.islice(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=1, augment="rrc")), 4))
    first = run[0][0]
    assert first.shape == plain.shape == (4, 3, SIZE, SIZE) and first.dtype == torch.uint8
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(first, plain)
    resumed = list(itertools.islice(iter(CachedCrops(cache, SIZE, 4, "cpu", seed=1, start=2 * 4, augment="rrc")), 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[2:], resumed))


def test_device_jitter_keeps_shape_and_dtype_and_changes_colours(cache):
    rrc = next(iter(CachedCrops(cache, SIZE, 8, "cpu", seed=2, augment="rrc")))[0]
    jit = next(iter(CachedCrops(cache, SIZE, 8, "cpu", seed=2, augment="rrc+jitter")))[0]
    assert jit.shape == rrc.shape and jit.dtype == torch.uint8
    changed = [not torch.equal(a, b) for a, b in zip(rrc, jit)]
    assert sum(changed) >= 4
    # same boxes: the crops' luma gradients line up
    for a, b in zip(rrc.float().mean(1), jit.float().mean(1)):
        ga, gb = a.diff(dim=1).flatten(), b.diff(dim=1).flatten()
        assert torch.corrcoef(torch.stack([ga, gb]))[0, 1] > 0.5


def test_device_rrc_boxes_cover_the_scale_range():
    """Sampled box areas span 20–100 % of the square (the zoom shows in how much of the source a crop spans)."""
    gen = torch.Generator().manual_seed(0)
    load, b = 64, 256
    ramp = torch.arange(load, dtype=torch.float32).mul(255 / (load - 1)).round().to(torch.uint8)
    rows = ramp[None, None, :, None].expand(b, load, load, 3).contiguous()  # x coordinate encoded as intensity
    out = resized_crops(rows, 16, torch.rand(b, DRAWS, generator=gen), jitter=False).float()
    span = (out[:, 0, 0, :].amax(1) - out[:, 0, 0, :].amin(1)) / 255  # ≈ the box's width in units of the side
    assert span.min() < 0.55 and span.max() > 0.95
    assert span.min() > math.sqrt(RRC_SCALE[0] * RRC_RATIO[0]) - 0.1  # never below the narrowest allowed box


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rrc_and_jitter_on_the_gpu(cache):
    crops, _ = next(iter(CachedCrops(cache, SIZE, 4, "cuda", seed=3, augment="rrc+jitter")))
    assert crops.device.type == "cuda" and crops.shape == (4, 3, SIZE, SIZE) and crops.dtype == torch.uint8
