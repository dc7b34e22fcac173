import os

import pytest
import torch

# Tests never reach the Hub: Hub code is exercised on local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def write_images(folder, n=12, size=(80, 96), seed=0):
    """Smooth colour images with a few shapes: learnable context, unlike pure noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    paths = []
    for i in range(n):
        base = np.stack([(np.sin(xx * rng.uniform(2, 6) + rng.uniform(0, 6)) + 1) / 2 * rng.uniform(0.3, 1)
                         for _ in range(3)], -1)
        img = Image.fromarray((base * 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            draw.ellipse([x0, y0, x0 + rng.integers(10, 30), y0 + rng.integers(10, 30)],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    write_images(tmp_path / "images")
    return tmp_path / "images"
