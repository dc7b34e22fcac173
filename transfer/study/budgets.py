"""Rows, columns and budgets of the feature study (``benchmarks/table2.py``), and its fixed data split."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.data import IMAGE_EXTENSIONS

# pretraining flags of each row (None: no pretraining, an initialisation)
ROWS: dict[str, list[str] | None] = {
    "ce-region": ["--mask", "random-region"],
    "ce-center": ["--mask", "center"],
    "autoencoder": ["--mask", "none"],
    "random-timm": None,
    "random-gaussian": None,
}
ROW_TITLES = {"ce-region": "context encoder (random region)", "ce-center": "context encoder (centre)",
              "autoencoder": "autoencoder", "random-timm": "random init (timm)",
              "random-gaussian": "random init (Gaussian + Krähenbühl)"}
IMAGEFOLDER = ("finetune", "linear", "knn")
VOC = ("voc-cls", "voc-det", "voc-seg")
COLUMNS = IMAGEFOLDER + VOC
METRIC = {"finetune": "top-1", "linear": "top-1", "knn": "top-1", "voc-cls": "mAP", "voc-det": "mAP@0.5",
          "voc-seg": "mIoU"}
# Table 2 of the paper (AlexNet, ~100K iterations): VOC classification mAP, Fast R-CNN mAP, FCN mIoU
PAPER = {"random-gaussian": (53.3, 43.4, 19.8), "autoencoder": (53.8, 41.9, 25.2), "ce-region": (56.5, 44.5, 29.7)}


@dataclass(frozen=True)
class Budget:
    """Sizes of one study.

    Attributes:
        backbone, image_size: the encoder and its pretraining input side.
        batch_size: pretraining images per step.
        milestones: pretraining steps at which every pretrained row is scored.
        train_per_class, val_per_class: ImageFolder images per class (None: all that are left).
        max_megabytes: cap on the bytes of images the study reads (train + val).
        finetune_steps, finetune_batch: fine-tuning length.
        transfer_size: crop side for the ImageFolder tasks.
        voc_steps: steps of the VOC classification / detection / segmentation runs.
        voc_size: VOC input side (detection: shorter side).
        columns: the default columns.
        mixed_precision: on a GPU.
    """

    backbone: str
    image_size: int
    batch_size: int
    milestones: tuple[int, ...]
    train_per_class: int | None
    val_per_class: int
    max_megabytes: float | None
    finetune_steps: int
    finetune_batch: int
    transfer_size: int
    voc_steps: tuple[int, int, int]
    voc_size: int
    columns: tuple[str, ...]
    mixed_precision: str = "bf16"


BUDGETS = {
    # CI-sized: 2 CPU cores, ≤ 15 minutes; shows that every path runs, not which row wins
    "smoke": Budget(backbone="alexnet", image_size=99, batch_size=8, milestones=(2, 4), train_per_class=6,
                    val_per_class=3, max_megabytes=5, finetune_steps=6, finetune_batch=16, transfer_size=99,
                    voc_steps=(2, 1, 1), voc_size=99, columns=IMAGEFOLDER, mixed_precision="no"),
    # one GPU, ≤ 10 minutes, ≤ 60 MB of images
    "small": Budget(backbone="alexnet", image_size=200, batch_size=64, milestones=(250, 1000, 2500),
                    train_per_class=350, val_per_class=100, max_megabytes=60, finetune_steps=1500,
                    finetune_batch=64, transfer_size=200, voc_steps=(500, 500, 500), voc_size=200,
                    columns=IMAGEFOLDER),
    # the small budget's images at the smoke budget's 99 px: the study on 2 CPU cores, e.g. to try an ablation
    # before renting a GPU. It runs to 128K images, where fine-tuning from the context encoder was measured ahead
    # of timm's raw init but behind a rescaled random init (docs/feature-study.md); 2,000 steps of one row took 30
    # min on one core, a fine-tuning cell 7 min, a linear probe 2 min (two of each side by side on 2 cores)
    "cpu": Budget(backbone="alexnet", image_size=99, batch_size=64, milestones=(250, 500, 1000, 2000),
                  train_per_class=350, val_per_class=100, max_megabytes=60, finetune_steps=500, finetune_batch=64,
                  transfer_size=99, voc_steps=(100, 100, 100), voc_size=99, columns=IMAGEFOLDER,
                  mixed_precision="no"),
    # the paper's length: 100K iterations of 64 images at 227 px
    "paper": Budget(backbone="alexnet", image_size=227, batch_size=64, milestones=(10_000, 25_000, 50_000, 100_000),
                    train_per_class=None, val_per_class=150, max_megabytes=None, finetune_steps=20_000,
                    finetune_batch=64, transfer_size=227, voc_steps=(8000, 20_000, 20_000), voc_size=227,
                    columns=COLUMNS),
}


class StudyError(ValueError):
    """Bad flags or data, reported as one line."""


def _row_int(flags: list[str] | None, name: str, default: int) -> int:
    """A row's own value of the integer flag ``name`` (the last one wins), else ``default``."""
    value = default
    for flag, nxt in zip(flags or [], (flags or [])[1:]):
        if flag == name:
            value = int(nxt)
    for flag in flags or []:
        if flag.startswith(f"{name}="):
            value = int(flag.split("=", 1)[1])
    return value


def row_batch_size(flags: list[str] | None, budget: Budget) -> int:
    """Pretraining images per step of a row: its own ``--batch-size`` override (the last one wins), else the
    budget's."""
    return _row_int(flags, "--batch-size", budget.batch_size)


def row_image_size(flags: list[str] | None, budget: Budget) -> int:
    """The side of a row's pretraining images: its own ``--image-size`` override, else the budget's."""
    return _row_int(flags, "--image-size", budget.image_size)


def prepare_data(source: Path, out: Path, budget: Budget, unlabeled_per_class: int = 0) -> dict:
    """Link a fixed, class-stratified split of ``source/<class>/*`` into ``out/train`` and ``out/val``.

    The split does not depend on ``--seeds`` (every seed sees the same images); pretraining reads ``out/train``
    (or ``out/pretrain``, below), never ``out/val``, so the validation images are new to every row. A ``source``
    that is already split (``train/<class>`` and ``val/<class>``, e.g. the ``data`` folder of another study) keeps
    its split, within the budget's numbers.

    ``unlabeled_per_class`` > 0 adds up to that many more images per class, from those neither in ``train`` nor in
    ``val``, for pretraining only (``--unlabeled-per-class``): ``out/pretrain/<class>`` then links the training
    images and these, and pretraining reads it (:func:`pretraining_folder`); the classifiers still see
    ``out/train`` only and the test images stay out of both, so the labelled split is the same as without them.
    The budget's megabyte cap bounds the labelled split only. A pre-split ``source`` gives its own
    ``pretrain/<class>`` images beyond its ``train`` ones.
    """
    if not source.is_dir():
        raise StudyError(f"--data {str(source)!r} does not exist")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise StudyError(f"--data {str(source)!r} is this study's own split; pass the folder it was made from, or "
                         "another --output-dir")
    presplit = (source / "train").is_dir() and (source / "val").is_dir()  # e.g. an unpacked --prepare-only split
    root = source / "train" if presplit else source
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise StudyError(f"--data {str(root)!r} needs one sub-folder of images per class (at least two)")

    def images(folder: Path) -> list[Path]:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        random.Random(0).shuffle(files)
        return files

    picked: dict[str, tuple[list[Path], list[Path]]] = {}
    for c in classes:
        if presplit:
            val = images(source / "val" / c.name)[:budget.val_per_class]
            train = images(c)[:budget.train_per_class]
        else:
            files = images(c)
            val = files[:budget.val_per_class]
            train = files[budget.val_per_class:][:budget.train_per_class]
        if len(val) < 1 or len(train) < 2:
            raise StudyError(f"class {c.name!r} of {str(source)!r} has {len(train)} training and {len(val)} test "
                             f"images to use; the study needs at least 2 and 1 ({budget.val_per_class} test images "
                             "per class are held out first)")
        picked[c.name] = (train, val)
    size = sum(p.stat().st_size for t, v in picked.values() for p in t + v)
    if budget.max_megabytes and size > budget.max_megabytes * 2**20:  # drop training images evenly to fit
        keep = (budget.max_megabytes * 2**20 - sum(p.stat().st_size for _, v in picked.values() for p in v)) / size
        picked = {c: (t[:max(2, int(len(t) * keep))], v) for c, (t, v) in picked.items()}
        size = sum(p.stat().st_size for t, v in picked.values() for p in t + v)
    manifest = {"source": str(source), "classes": list(picked), "megabytes": round(size / 2**20, 2),
                "train_images": sum(len(t) for t, _ in picked.values()),
                "val_images": sum(len(v) for _, v in picked.values())}
    unlabeled: dict[str, list[Path]] = {}
    if unlabeled_per_class:
        for c, (train, val) in picked.items():
            taken = {p.name for p in train + val}
            folder = source / "pretrain" / c if presplit else root / c
            pool = images(folder) if folder.is_dir() else []
            unlabeled[c] = [p for p in pool if p.name not in taken][:unlabeled_per_class]
        if not any(unlabeled.values()):
            raise StudyError(f"--unlabeled-per-class: {str(source)!r} has no images beyond the "
                             f"{manifest['train_images']} training and {manifest['val_images']} test images")
        # recorded only when asked for, so that an earlier study's manifest (and its split) stays valid
        manifest["unlabeled_images"] = sum(map(len, unlabeled.values()))
        manifest["unlabeled_megabytes"] = round(sum(p.stat().st_size for u in unlabeled.values() for p in u)
                                                / 2**20, 2)
    marker = out / "manifest.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return manifest
    shutil.rmtree(out, ignore_errors=True)
    for c, (train, val) in picked.items():
        for split, files in (("train", train), ("val", val)):
            (out / split / c).mkdir(parents=True, exist_ok=True)
            for p in files:
                (out / split / c / p.name).symlink_to(p.resolve())
        if unlabeled:
            (out / "pretrain" / c).mkdir(parents=True, exist_ok=True)
            for p in train + unlabeled[c]:
                (out / "pretrain" / c / p.name).symlink_to(p.resolve())
    write_text_atomic(marker, json.dumps(manifest, indent=2) + "\n")
    return manifest


def pretraining_folder(data: Path) -> Path:
    """The images pretraining reads in a split made by :func:`prepare_data`: ``pretrain`` (the training images plus
    the unlabeled ones) where the split has one, else ``train``."""
    return data / "pretrain" if (data / "pretrain").is_dir() else data / "train"
