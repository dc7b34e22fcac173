"""A tiny synthetic PASCAL VOC in the standard VOCdevkit layout, for tests and smoke runs.

Every image holds one to three filled shapes, each class with its own colour, so a detector, a classifier and a
segmenter can all learn something in a few iterations. Written: ``JPEGImages``, ``Annotations`` (XML with
``difficult``), ``SegmentationClass`` (palette PNG with a 255 void border), ``SegmentationClassAug`` (no border),
and ``ImageSets/{Main,Segmentation,SegmentationAug}`` split files.

    python -m transfer.common.synthetic_voc OUT_DIR --images 24 --year 2007
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .voc import VOC_CLASSES

__all__ = ["make_synthetic_voc", "voc_palette"]

DEFAULT_CLASSES = ("car", "cat", "dog", "person")


def voc_palette() -> list[int]:
    """The VOC colour map (768 values), as in the devkit's ``VOClabelcolormap``."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _xml(image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{diff}</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1), diff in objects)
    return (f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>1</segmented>{body}</annotation>\n")


def make_synthetic_voc(root: str | os.PathLike, num_images: int = 24, year: int = 2007, size: int = 96,
                       classes: tuple[str, ...] = DEFAULT_CLASSES, seed: int = 0) -> Path:
    """Write the dataset under ``root/VOCdevkit/VOC<year>``; returns ``root/VOCdevkit``.

    Splits: ``train`` / ``val`` halves, ``trainval`` all, ``test`` = ``val`` (Main); the same for Segmentation
    ``aug`` = ``train`` (the SBD ids of mmseg's layout) and ``train_aug`` = ``train`` under SegmentationAug.
    """
    rng = random.Random(seed)
    voc = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationClassAug", "ImageSets/Main",
                "ImageSets/Segmentation", "ImageSets/SegmentationAug"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    colours = {name: tuple(rng.randrange(40, 256) for _ in range(3)) for name in classes}
    palette = voc_palette()
    ids = []
    for n in range(num_images):
        image_id = f"{year}_{n:06d}"
        w, h = size + rng.randrange(0, size // 3), size + rng.randrange(0, size // 3)
        background = tuple(rng.randrange(0, 60) for _ in range(3))
        image = Image.new("RGB", (w, h), background)
        mask = Image.new("L", (w, h), 0)
        draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        objects = []
        for k in range(rng.randint(1, 3)):
            name = classes[(n + k) % len(classes)]
            bw, bh = rng.randrange(w // 4, w // 2), rng.randrange(h // 4, h // 2)
            x0, y0 = rng.randrange(0, w - bw), rng.randrange(0, h - bh)
            box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
            shape = draw.ellipse if VOC_CLASSES.index(name) % 2 else draw.rectangle
            shape(box, fill=colours[name])
            (mdraw.ellipse if shape == draw.ellipse else mdraw.rectangle)(box, fill=VOC_CLASSES.index(name) + 1)
            objects.append((name, (x0 + 1, y0 + 1, x0 + bw, y0 + bh), int(k == 2 and n % 2 == 0)))
        noise = np.random.default_rng(seed + n).integers(-12, 13, (h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image, int) + noise, 0, 255).astype(np.uint8))
        image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, w, h, objects))
        aug = mask.copy()
        aug.putpalette(palette)
        aug.save(voc / "SegmentationClassAug" / f"{image_id}.png")
        arr = np.asarray(mask)
        edges = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) != np.asarray(mask.filter(ImageFilter.MinFilter(3)))
        official = Image.fromarray(np.where(edges, 255, arr).astype(np.uint8), mode="L").convert("P")
        official.putpalette(palette)
        official.save(voc / "SegmentationClass" / f"{image_id}.png")
        ids.append(image_id)
    half = len(ids) // 2
    splits = {"train": ids[:half], "val": ids[half:], "trainval": ids, "test": ids[half:]}
    for name, members in splits.items():
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(members) + "\n")
        if name != "test":
            (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(members) + "\n")
    (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("\n".join(splits["train"]) + "\n")
    (voc / "ImageSets" / "Segmentation" / "aug.txt").write_text("\n".join(splits["train"]) + "\n")
    return voc.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--year", type=int, default=2007)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_synthetic_voc(args.root, args.images, args.year, args.size, seed=args.seed))


if __name__ == "__main__":
    main()
