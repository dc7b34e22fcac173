import numpy as np
import pytest
import torch
from PIL import Image

from ce_pretrain import ShapeBank, make_masks, mask_coverage

RANDOM_KINDS = [("random-block", "procedural"), ("random-region", "procedural"), ("random-region", "noise")]


def test_center_is_half_side_square():
    mask = make_masks("center", 3, 128, 128)
    assert mask.shape == (3, 1, 128, 128) and mask.dtype == torch.bool
    rows, cols = mask[0, 0].nonzero().T
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32, 95, 32, 95)
    shrunk = make_masks("center", 1, 128, 128, overlap=7)
    rows, cols = shrunk[0, 0].nonzero().T
    assert (rows.min(), rows.max()) == (39, 88)  # 64 − 2·7 = 50 px hole inside the 64 px prediction


@pytest.mark.parametrize("kind,source", RANDOM_KINDS)
@pytest.mark.parametrize("size", [(227, 227), (128, 96)])
def test_random_masks_cover_some_and_at_most_a_quarter(kind, source, size):
    for seed in range(5):
        mask = make_masks(kind, 32, *size, generator=torch.Generator().manual_seed(seed), source=source)
        assert mask.shape == (32, 1, *size) and mask.dtype == torch.bool
        cov = mask_coverage(mask)
        assert (cov > 0).all() and (cov <= 0.25).all(), (cov.min(), cov.max())


@pytest.mark.parametrize("kind,source", RANDOM_KINDS)
def test_masks_are_reproducible_and_vary(kind, source):
    a = make_masks(kind, 8, 96, 96, generator=torch.Generator().manual_seed(3), source=source)
    b = make_masks(kind, 8, 96, 96, generator=torch.Generator().manual_seed(3), source=source)
    c = make_masks(kind, 8, 96, 96, generator=torch.Generator().manual_seed(4), source=source)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({m.numpy().tobytes() for m in a}) == 8  # each image of a batch gets its own mask


def test_region_coverage_follows_the_requested_range():
    mask = make_masks("random-region", 64, 100, 100, generator=torch.Generator().manual_seed(0),
                      coverage=(0.2, 0.2))
    assert torch.allclose(mask_coverage(mask), torch.full((64,), 0.2))


def test_masks_do_not_depend_on_the_build_device():
    """Randomness is drawn on the generator's device, so a seed gives one mask wherever it is built."""
    a = make_masks("random-region", 4, 64, 64, generator=torch.Generator().manual_seed(5), device="cpu")
    b = make_masks("random-region", 4, 64, 64, generator=torch.Generator().manual_seed(5), device=torch.device("cpu"))
    assert a.device.type == "cpu" and torch.equal(a, b)


def _write_label_pngs(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((80, 120), np.uint8)
        y, x = rng.integers(5, 40), rng.integers(5, 60)
        labels[y: y + 30, x: x + 40] = 1  # a rectangle object
        yy, xx = np.mgrid[:80, :120]
        labels[(yy - 60) ** 2 + (xx - 90) ** 2 < 150] = 2  # a disc object
        labels[0, :] = 255  # void border is not an object
        Image.fromarray(labels, mode="L").save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not a mask")


def test_shape_bank_from_folder(tmp_path):
    _write_label_pngs(tmp_path / "masks")
    bank = ShapeBank.from_folder(tmp_path / "masks", size=32)
    assert len(bank) == 8  # two objects in each of four images
    for seed in range(3):
        mask = make_masks("random-region", 16, 96, 96, generator=torch.Generator().manual_seed(seed), source=bank)
        cov = mask_coverage(mask)
        assert (cov > 0).all() and (cov <= 0.25).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_masks("circle", 1, 64, 64)
    with pytest.raises(ValueError, match="coverage"):
        make_masks("random-region", 1, 64, 64, coverage=(0.1, 0.5))
    with pytest.raises(ValueError, match="region source"):
        make_masks("random-region", 1, 64, 64, source="voc")
    with pytest.raises(ValueError, match="overlap"):
        make_masks("center", 1, 64, 64, overlap=16)


def test_shape_bank_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShapeBank.from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no object masks"):
        ShapeBank.from_folder(tmp_path / "empty")
