import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ce_pretrain.data import (
    DataSourceError,
    EpochSampler,
    ImageDataset,
    collate,
    list_images,
    load_rgb,
)
from ce_pretrain.sources import open_source, sample_images


def test_builtin_sample_is_real_photographs():
    files = sample_images()
    assert len(files) >= 10
    sizes = [Image.open(f).size for f in files]
    assert all(min(s) >= 128 for s in sizes)


def test_list_images_recursive_and_errors(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.JPG", "a/b/y.png", "a/b/z.webp", "a/b/w.bmp", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = [str(p.relative_to(tmp_path)) for p in list_images(tmp_path)]
    assert found == ["a/b/w.bmp", "a/b/y.png", "a/b/z.webp", "a/x.JPG"]
    with pytest.raises(DataSourceError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="holds no images"):
        list_images(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        path = tmp_path / "x.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # 16-bit is rescaled, not clipped to white
        assert abs(np.asarray(out).mean() - np.asarray(rgb.convert("L")).mean()) < 2


def test_bad_files_are_replaced_and_reported(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    files = sorted(tmp_path.iterdir())
    ds = ImageDataset(files, image_size=32)
    crops, bad = collate([ds[(0, i)] for i in range(len(files))])
    assert crops.shape == (4, 3, 32, 32) and crops.dtype == torch.uint8
    assert {p.split("/")[-1] for p in bad} >= {"empty.jpg", "text.png", "truncated.png"}


def test_small_images_are_upscaled(tmp_path):
    Image.new("RGB", (10, 7), (200, 0, 0)).save(tmp_path / "tiny.png")
    crop, bad = ImageDataset([tmp_path / "tiny.png"], image_size=64)[(0, 0)]
    assert crop.shape == (3, 64, 64) and not bad


def test_crops_depend_only_on_seed_epoch_index(image_folder):
    files = list_images(image_folder)
    a = ImageDataset(files, 48, seed=1)[(2, 5)][0]
    b = ImageDataset(files, 48, seed=1, cache=True)[(2, 5)][0]
    c = ImageDataset(files, 48, seed=1)[(3, 5)][0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_epoch_sampler_shards_and_resumes():
    full = EpochSampler(10, seed=3)
    stream = [next(it) for it in [iter(full)] for _ in range(25)]
    assert sorted(i for e, i in stream[:10]) == list(range(10))  # each epoch is a permutation
    assert [i for _, i in stream[:10]] != [i for _, i in stream[10:20]]
    resumed = iter(EpochSampler(10, seed=3, start=13))
    assert [next(resumed) for _ in range(12)] == stream[13:25]
    ranks = [iter(EpochSampler(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    shard = [[next(it)[1] for _ in range(5)] for it in ranks]
    assert sorted(shard[0] + shard[1]) == list(range(10))


def test_open_source_folder_and_saved_dataset(image_folder, tmp_path):
    items, column, desc = open_source(str(image_folder))
    assert column is None and len(items) == 12 and "12 images" in desc
    datasets = pytest.importorskip("datasets", reason="the [datasets] extra is not installed")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in items]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    items, column, desc = open_source(str(tmp_path / "saved"))
    assert column == "image" and len(items) == 12
    crop, bad = ImageDataset(items, 32, image_column=column)[(0, 3)]
    assert crop.shape == (3, 32, 32) and not bad


def test_open_source_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    items, column, desc = open_source(None)
    assert "demo" in desc and column is None


def test_streaming_resumes_exactly(image_folder):
    datasets = pytest.importorskip("datasets", reason="the [datasets] extra is not installed")
    from ce_pretrain.data import StreamingImageDataset

    files = [str(p) for p in list_images(image_folder)]
    ds = datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())
    stream = ds.to_iterable_dataset(num_shards=2)
    full = list(itertools.islice(iter(StreamingImageDataset(stream, 32, "image", seed=4, buffer_size=5)), 30))
    assert len(full) == 30  # runs on through epochs
    resumed = list(itertools.islice(iter(StreamingImageDataset(stream, 32, "image", seed=4, buffer_size=5,
                                                               start=17)), 13))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(full[17:], resumed))
    shards = [list(itertools.islice(iter(StreamingImageDataset(stream, 32, "image", rank=r, world_size=2)), 6))
              for r in range(2)]
    assert not any(np.array_equal(a[0], b[0]) for a in shards[0] for b in shards[1])
