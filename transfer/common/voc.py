"""PASCAL VOC in its standard VOCdevkit layout: detection (XML boxes), classification (multi-label from the
XML) and segmentation (palette PNG masks, 255 = void).

``data_root`` may be the ``VOCdevkit`` folder (holding ``VOC2007``/``VOC2012``), the ``VOC<year>`` folder
itself, or a folder holding ``VOCdevkit``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import UsageError

__all__ = [
    "VOC_CLASSES",
    "VOCClassification",
    "VOCDetection",
    "VOCLayoutError",
    "VOCSegmentation",
    "holdout_split",
    "parse_annotation",
    "read_split",
    "resolve_voc_dir",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255


class VOCLayoutError(FileNotFoundError):
    """The data root is missing or is not in the VOCdevkit layout."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resolve_voc_dir(data_root: str | os.PathLike, year: int | str) -> Path:
    """The ``VOC<year>`` folder under ``data_root`` (see the module docstring for accepted roots)."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise VOCLayoutError(f"--data-root {str(root)!r} does not exist")
    name = f"VOC{year}"
    for candidate in (root, root / name, root / "VOCdevkit" / name):
        if candidate.name == name and (candidate / "JPEGImages").is_dir():
            return candidate
    raise VOCLayoutError(f"no {name}/JPEGImages under {str(root)!r}: expected VOCdevkit/{name}/JPEGImages "
                         f"(pass the VOCdevkit folder or {name} itself as --data-root)")


def read_split(voc_dir: Path, task: str, split: str) -> list[str]:
    """Image ids of ``ImageSets/<task>/<split>.txt`` (for segmentation, ``SegmentationAug`` is searched too)."""
    folders = {"Main": ["Main"], "Segmentation": ["Segmentation", "SegmentationAug"]}[task]
    for folder in folders:
        path = voc_dir / "ImageSets" / folder / f"{split}.txt"
        if path.is_file():
            ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            if not ids:
                raise VOCLayoutError(f"split file {str(path)!r} is empty")
            return ids
    tried = " or ".join(str(voc_dir / "ImageSets" / f / f"{split}.txt") for f in folders)
    raise VOCLayoutError(f"split {split!r} not found: no {tried}")


def holdout_split(ids: list[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically carve a held-out ``fraction`` of ``ids``: ``(train, held_out)``, both sorted."""
    if not 0 < fraction < 1:
        raise UsageError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n = max(1, round(len(ids) * fraction))
    return sorted(shuffled[n:]), sorted(shuffled[:n])


@dataclass
class Annotation:
    """Objects of one image. ``boxes`` are ``[N, 4]`` continuous ``x0, y0, x1, y1`` (VOC's 1-based inclusive
    ``xmin - 1, ymin - 1, xmax, ymax``, the detectron2 convention); ``labels`` index :data:`VOC_CLASSES`."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    width: int
    height: int


def parse_annotation(path: Path) -> Annotation:
    """Read one VOC XML file; a missing ``difficult`` field counts as not difficult."""
    if not path.is_file():
        raise VOCLayoutError(f"annotation {str(path)!r} is missing")
    root = ET.parse(path).getroot()
    size = root.find("size")
    width = int(float(size.findtext("width"))) if size is not None else 0
    height = int(float(size.findtext("height"))) if size is not None else 0
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = obj.findtext("name", "").strip()
        if name not in VOC_CLASSES:
            raise VOCLayoutError(f"{str(path)!r}: unknown class {name!r}")
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])
        labels.append(VOC_CLASSES.index(name))
        difficult.append(int(obj.findtext("difficult", "0") or 0))
    return Annotation(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                      np.asarray(difficult, bool), width, height)


class _VOCBase(torch.utils.data.Dataset):
    task = "Main"

    def __init__(self, data_root: str | os.PathLike, year: int | str = 2007, split: str = "trainval",
                 ids: list[str] | None = None, transform=None):
        self.voc_dir = resolve_voc_dir(data_root, year)
        self.ids = list(ids) if ids is not None else read_split(self.voc_dir, self.task, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: str) -> Image.Image:
        path = self.voc_dir / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file():
            raise VOCLayoutError(f"image {str(path)!r} is missing")
        return Image.open(path).convert("RGB")

    def annotation(self, image_id: str) -> Annotation:
        return parse_annotation(self.voc_dir / "Annotations" / f"{image_id}.xml")

    def _missing(self, image_id: str) -> str | None:
        """What this task cannot find for ``image_id`` (a path), or None."""
        for path in (self.voc_dir / "JPEGImages" / f"{image_id}.jpg", self.voc_dir / "Annotations" / f"{image_id}.xml"):
            if not path.is_file():
                return str(path.relative_to(self.voc_dir))
        return None

    def check_files(self) -> None:
        """Find every missing file up front (not in a data-loading worker mid-run).

        Raises:
            VOCLayoutError: one line with how many ids lack a file and the first few paths.
        """
        missing = [m for m in map(self._missing, self.ids) if m is not None]
        if missing:
            raise VOCLayoutError(f"{len(missing)} of {len(self.ids)} ids lack a file under {str(self.voc_dir)!r}: "
                                 f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")


class VOCDetection(_VOCBase):
    """Items ``(image [3, H, W] in [0, 1], target)`` with target ``boxes [N, 4]`` (continuous xyxy),
    ``labels [N]`` in 1..20 (0 is background, torchvision's convention), ``difficult [N]`` and ``image_id``.

    Args:
        data_root: see the module docstring.
        year: 2007 or 2012.
        split: ``ImageSets/Main/<split>.txt``.
        ids: explicit image ids instead of a split file.
        transform: ``(image, target) → (image, target)`` applied last.
        keep_difficult: keep difficult objects (for evaluation; training usually drops them).
    """

    def __init__(self, data_root, year=2007, split="trainval", ids=None, transform=None, keep_difficult=False):
        super().__init__(data_root, year, split, ids, transform)
        self.keep_difficult = keep_difficult

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        ann = self.annotation(image_id)
        keep = np.ones(len(ann.labels), bool) if self.keep_difficult else ~ann.difficult
        image = torch.from_numpy(np.array(self.load_image(image_id))).permute(2, 0, 1).float().div(255)
        target = {"boxes": torch.from_numpy(ann.boxes[keep]), "labels": torch.from_numpy(ann.labels[keep] + 1),
                  "difficult": torch.from_numpy(ann.difficult[keep]), "image_id": image_id}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class VOCClassification(_VOCBase):
    """Items ``(image, target [20])`` with target 1 (present), -1 (absent) or 0 (only difficult instances:
    ignored, as the VOC devkit does). ``transform`` maps the PIL image."""

    def targets(self, image_id: str) -> torch.Tensor:
        ann = self.annotation(image_id)
        target = torch.full((len(VOC_CLASSES),), -1, dtype=torch.int8)
        for label, difficult in zip(ann.labels, ann.difficult):
            if not difficult:
                target[label] = 1
            elif target[label] == -1:
                target[label] = 0
        return target

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        return (self.transform(image) if self.transform else image), self.targets(image_id)


class VOCSegmentation(_VOCBase):
    """Items ``(image, mask)``: PIL RGB image and PIL mask of class indices (0 background, 1..20, 255 void).

    Masks come from ``SegmentationClass`` (official, with the void border) and, for ids it lacks, from
    ``SegmentationClassAug`` (the SBD-augmented set). ``transform`` maps ``(image, mask)``.
    """

    task = "Segmentation"

    def mask_path(self, image_id: str) -> Path:
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            path = self.voc_dir / folder / f"{image_id}.png"
            if path.is_file():
                return path
        raise VOCLayoutError(f"no mask for {image_id!r} in {str(self.voc_dir)!r}/SegmentationClass or "
                             "SegmentationClassAug")

    def _missing(self, image_id: str) -> str | None:
        image = self.voc_dir / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            return str(image.relative_to(self.voc_dir))
        if not any((self.voc_dir / f / f"{image_id}.png").is_file() for f in ("SegmentationClass",
                                                                            "SegmentationClassAug")):
            return f"SegmentationClass[Aug]/{image_id}.png"
        return None

    def load_mask(self, image_id: str) -> Image.Image:
        mask = Image.open(self.mask_path(image_id))
        if mask.mode not in ("P", "L"):
            raise VOCLayoutError(f"mask of {image_id!r} is {mask.mode}; expected a palette or grayscale PNG of "
                                 "class indices")
        return Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L")

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image, mask = self.load_image(image_id), self.load_mask(image_id)
        return self.transform(image, mask) if self.transform else (image, mask)
