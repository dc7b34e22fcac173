"""The feature study: does context-encoder pretraining give better starting weights than random init, and how fast?

Rows (pretraining): the context encoder with random-region masks and with the central mask, the paper's
autoencoder (the same network reconstructing its whole input: ``--mask none``), and two random initialisations
(timm's own, and the paper's Gaussian: N(0, 0.01²) weights made usable by Krähenbühl et al.'s data-dependent
initialisation). Columns (transfer): ImageFolder classification (fine-tune, linear probe, kNN; on images the
pretraining never saw) and the VOC tasks (classification mAP, Faster R-CNN mAP@0.5, FCN mIoU). Every pretrained row
is scored at several points of its pretraining, so the study shows score against pretraining images seen.

    python benchmarks/table2.py --budget smoke --output-dir runs/table2-smoke                 # CPU, minutes
    python benchmarks/table2.py --budget small --data ../shared/data/imagenette-train --seeds 0 1 2   # one GPU
    python benchmarks/table2.py --budget paper --seeds 0                                        # 100K iterations

Writes ``results.json`` (every cell, written after each), ``table2.md`` and ``table2.png``. A finished cell is never
recomputed: rerun the same command after a crash and it continues (pretraining resumes from its checkpoint).
Ablations: ``--add-row NAME="TRAIN FLAGS"`` adds a pretraining row (flags of ``python -m ce_pretrain.train``),
``--pretrain-override ROW="FLAGS"`` changes a row; see docs/feature-study.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ce_pretrain.atomic import write_atomic, write_text_atomic
from ce_pretrain.data import IMAGE_EXTENSIONS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

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
    # the paper's length: 100K iterations of 64 images at 227 px
    "paper": Budget(backbone="alexnet", image_size=227, batch_size=64, milestones=(10_000, 25_000, 50_000, 100_000),
                    train_per_class=None, val_per_class=150, max_megabytes=None, finetune_steps=20_000,
                    finetune_batch=64, transfer_size=227, voc_steps=(8000, 20_000, 20_000), voc_size=227,
                    columns=COLUMNS),
}


class StudyError(ValueError):
    """Bad flags or data, reported as one line."""


# ------------------------------------------------------------------------------------------------------- data
def prepare_data(source: Path, out: Path, budget: Budget) -> dict:
    """Link a fixed, class-stratified split of ``source/<class>/*`` into ``out/train`` and ``out/val``.

    The split does not depend on ``--seeds`` (every seed sees the same images); pretraining reads ``out/train``
    only, so the validation images are new to every row.
    """
    if not source.is_dir():
        raise StudyError(f"--data {str(source)!r} does not exist")
    classes = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise StudyError(f"--data {str(source)!r} needs one sub-folder of images per class (at least two)")
    picked: dict[str, tuple[list[Path], list[Path]]] = {}
    for c in classes:
        files = sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        random.Random(0).shuffle(files)
        val = files[:budget.val_per_class]
        train = files[budget.val_per_class:][:budget.train_per_class]
        if len(val) < 1 or len(train) < 2:
            raise StudyError(f"class folder {str(c)!r} has {len(files)} images; the budget needs at least "
                             f"{budget.val_per_class + 2}")
        picked[c.name] = (train, val)
    size = sum(p.stat().st_size for t, v in picked.values() for p in t + v)
    if budget.max_megabytes and size > budget.max_megabytes * 2**20:  # drop training images evenly to fit
        keep = (budget.max_megabytes * 2**20 - sum(p.stat().st_size for _, v in picked.values() for p in v)) / size
        picked = {c: (t[:max(2, int(len(t) * keep))], v) for c, (t, v) in picked.items()}
        size = sum(p.stat().st_size for t, v in picked.values() for p in t + v)
    manifest = {"source": str(source), "classes": list(picked), "megabytes": round(size / 2**20, 2),
                "train_images": sum(len(t) for t, _ in picked.values()),
                "val_images": sum(len(v) for _, v in picked.values())}
    marker = out / "manifest.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return manifest
    shutil.rmtree(out, ignore_errors=True)
    for c, (train, val) in picked.items():
        for split, files in (("train", train), ("val", val)):
            (out / split / c).mkdir(parents=True, exist_ok=True)
            for p in files:
                (out / split / c / p.name).symlink_to(p.resolve())
    write_text_atomic(marker, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------------ pretraining
def _save_timm_folder(model: torch.nn.Module, backbone: str, image_size: int, dst: Path, note: str) -> None:
    from safetensors.torch import save_file
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    config = {"architecture": backbone, "num_classes": 0, "ce_pretrain": {"objective": note},
              "pretrained_cfg": {"input_size": [3, image_size, image_size], "mean": list(IMAGENET_DEFAULT_MEAN),
                                 "std": list(IMAGENET_DEFAULT_STD), "num_classes": 0}}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, dst)


def initialisation(row: str, budget: Budget, seed: int, dst: Path) -> Path:
    """A random-init row as a timm encoder folder: timm's initialisation, or the paper's Gaussian, under ``seed``."""
    import timm

    import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)
    from transfer.common.rescale import gaussian_init_

    if not (dst / "model.safetensors").is_file():
        torch.manual_seed(seed)
        model = timm.create_model(budget.backbone, pretrained=False, num_classes=0)
        if row == "random-gaussian":
            gaussian_init_(model, std=0.01, seed=seed)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _save_timm_folder(model, budget.backbone, budget.image_size, dst, row)
    return dst


def pretrain(row: str, flags: list[str], budget: Budget, seed: int, steps: int, args: argparse.Namespace,
             out: Path, data: Path) -> Path:
    """The encoder of ``row`` after ``steps`` pretraining steps (``python -m ce_pretrain.train``, resumed)."""
    run_dir = out / "pretrain" / row / f"seed{seed}"
    snap = run_dir / f"encoder-step{steps}"
    if (snap / "model.safetensors").is_file():
        return snap
    cmd = [sys.executable, "-m", "ce_pretrain.train", "--preset", "features", "--backbone", budget.backbone,
           "--image-size", str(budget.image_size), "--batch-size", str(budget.batch_size), "--max-steps", str(steps),
           "--data", str(data), "--seed", str(seed), "--output-dir", str(run_dir), "--num-workers",
           str(args.num_workers), "--checkpoint-every", str(max(100, steps // 4)), "--keep-checkpoints", "1",
           "--sample-every", str(10**9), "--log-every", str(max(1, min(50, steps))), *flags]
    if args.cpu:
        cmd.append("--cpu")
    elif torch.cuda.is_available():
        cmd += ["--mixed-precision", args.mixed_precision or budget.mixed_precision]
    if (run_dir / "checkpoints").is_dir():
        cmd.append("--resume")
    log = run_dir / "pretrain.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise StudyError(f"pretraining {row} (seed {seed}) to step {steps} failed (exit {done.returncode}); "
                         f"see {log}")
    tmp = snap.with_name(f".{snap.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "timm-encoder", tmp)
    os.replace(tmp, snap)
    return snap


# --------------------------------------------------------------------------------------------------- transfer
def _voc_cell(column: str, source: str, budget: Budget, args: argparse.Namespace, seed: int, cell_dir: Path) -> dict:
    """One VOC run with the entry point's config dataclass (fields it lacks are left out)."""
    if column == "voc-cls":
        from transfer.classification.train import ClassificationConfig as Config
        from transfer.classification.train import run
        kw = dict(holdout=0.2, image_size=budget.voc_size, max_steps=budget.voc_steps[0], batch_size=32)
        key = "mAP"
    elif column == "voc-det":
        from transfer.torchvision_det.train import DetectionConfig as Config
        from transfer.torchvision_det.train import run
        kw = dict(holdout=0.2, min_size=budget.voc_size, max_size=int(budget.voc_size * 5 / 3),
                  max_steps=budget.voc_steps[1], batch_size=2, test_proposals=300)
        key = "mAP"
    else:
        from transfer.torchvision_seg.train import SegmentationConfig as Config
        from transfer.torchvision_seg.train import run
        kw = dict(train_split="aug", test_split="train", crop_size=budget.voc_size, max_steps=budget.voc_steps[2],
                  batch_size=8)
        key = "mIoU"
    kw.update(model=source, data_root=str(args.voc_root), year=2012, seed=seed, workers=args.num_workers,
              num_workers=args.num_workers, output_dir=str(cell_dir), overwrite=True, cpu=args.cpu,
              mixed_precision=None if args.cpu else (args.mixed_precision or budget.mixed_precision))
    names = {f.name for f in dataclasses.fields(Config)}
    result = run(Config(**{k: v for k, v in kw.items() if k in names}))
    return {"score": result[key], "steps": result.get("steps")}


def _imagefolder_cell(column: str, source: str, row: str, budget: Budget, args: argparse.Namespace, seed: int,
                      data: Path, cell_dir: Path) -> dict:
    from transfer.imagefolder.train import ImageFolderConfig, run

    rescale = args.rescale or row == "random-gaussian"
    kw = dict(model=source, train=str(data / "train"), val=str(data / "val"), mode=column,
              output_dir=str(cell_dir), image_size=budget.transfer_size, batch_size=budget.finetune_batch,
              num_workers=args.num_workers, seed=seed, cpu=args.cpu,
              mixed_precision="no" if args.cpu else (args.mixed_precision or budget.mixed_precision),
              rescale=rescale, rescale_beta=0.0 if row == "random-gaussian" else None,
              max_steps=budget.finetune_steps, overwrite=True)
    names = {f.name for f in dataclasses.fields(ImageFolderConfig)}
    result = run(ImageFolderConfig(**{k: v for k, v in kw.items() if k in names}))
    return {"score": result["top1"], "top5": result["top5"], "stage": result.get("stage"),
            "steps": result.get("steps")}


# ------------------------------------------------------------------------------------------------------ study
def _environment(args: argparse.Namespace) -> dict:
    import accelerate
    import timm
    import torchvision

    gpu = torch.cuda.is_available() and not args.cpu
    return {"device": torch.cuda.get_device_name(0) if gpu else f"{platform.machine()} CPU ×{_cpus()}",
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def row_batch_size(flags: list[str] | None, budget: Budget) -> int:
    """Pretraining images per step of a row: its own ``--batch-size`` override (the last one wins), else the budget's."""
    batch = budget.batch_size
    for flag, value in zip(flags or [], (flags or [])[1:]):
        if flag == "--batch-size":
            batch = int(value)
    for flag in flags or []:
        if flag.startswith("--batch-size="):
            batch = int(flag.split("=", 1)[1])
    return batch


def cell_key(row: str, seed: int, images: int, column: str) -> str:
    return f"{row}/seed{seed}/images{images}/{column}"


@dataclass
class Study:
    """Rows, columns and the results so far (``results.json``)."""

    out: Path
    budget_name: str
    budget: Budget
    rows: dict[str, list[str] | None]
    columns: tuple[str, ...]
    seeds: list[int]
    cells: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self) -> None:
        payload = {"budget": self.budget_name, "budget_sizes": dataclasses.asdict(self.budget), **self.meta,
                   "rows": self.rows, "columns": list(self.columns), "seeds": self.seeds, "cells": self.cells}
        write_text_atomic(self.out / "results.json", json.dumps(payload, indent=2) + "\n")


def load_cells(out: Path) -> dict[str, dict]:
    """The finished cells of an earlier run in ``out`` (none if there is no readable ``results.json``)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("cells", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def run_study(study: Study, args: argparse.Namespace, data: Path, log=print) -> None:
    """Fill every missing cell, saving ``results.json`` after each."""
    budget = study.budget
    last = budget.milestones[-1]
    for seed in study.seeds:
        for row, flags in study.rows.items():
            points = [0] if flags is None else list(budget.milestones)
            for steps in points:
                images = steps * row_batch_size(flags, budget)
                todo = [c for c in study.columns if cell_key(row, seed, images, c) not in study.cells
                        and (c in ("linear", "knn") or steps in (0, last))]  # fine-tune and VOC: final weights
                if not todo:
                    continue
                if flags is None:
                    source = initialisation(row, budget, seed, study.out / "pretrain" / row / f"seed{seed}" / "init")
                else:
                    started = time.time()
                    source = pretrain(row, flags, budget, seed, steps, args, study.out, data / "train")
                    log(f"pretrained {row} seed {seed} to {images} images ({time.time() - started:.0f} s)")
                for column in todo:
                    key = cell_key(row, seed, images, column)
                    cell_dir = study.out / "cells" / key.replace("/", "_")
                    started = time.time()
                    if column in IMAGEFOLDER:
                        cell = _imagefolder_cell(column, str(source), row, budget, args, seed, data, cell_dir)
                    else:
                        cell = _voc_cell(column, str(source), budget, args, seed, cell_dir)
                    cell.update(row=row, seed=seed, images=images, column=column,
                                seconds=round(time.time() - started, 1))
                    study.cells[key] = cell
                    study.save()
                    log(f"{key}: {METRIC[column]} {cell['score']:.1f}")


def summarise(cells: dict[str, dict]) -> dict[tuple[str, int, str], tuple[float, float, int]]:
    """``(row, images, column) → (mean, std, seeds)`` over seeds."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for cell in cells.values():
        groups.setdefault((cell["row"], cell["images"], cell["column"]), []).append(cell["score"])
    out = {}
    for k, v in groups.items():
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        out[k] = (mean, std, len(v))
    return out


def _fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def format_table(cells: dict[str, dict], rows: list[str], columns: list[str], header: str) -> str:
    """The final-weights table (each row at its most pretraining images) and the table by images seen."""
    stats = summarise(cells)
    final = {r: max((k[1] for k in stats if k[0] == r), default=0) for r in rows}
    lines = [header, "", "| pretraining | images seen | " + " | ".join(f"{c} {METRIC[c]}" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {ROW_TITLES.get(r, r)} | {final[r]:,} | "
                     + " | ".join(_fmt(stats.get((r, final[r], c))) for c in columns) + " |")
    lines += ["", "By pretraining images seen:", "", "| pretraining | images seen | "
              + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in rows:
        for images in sorted({k[1] for k in stats if k[0] == r}):
            lines.append(f"| {ROW_TITLES.get(r, r)} | {images:,} | "
                         + " | ".join(_fmt(stats.get((r, images, c))) for c in columns) + " |")
    voc = [c for c in columns if c in VOC]
    if voc:
        lines += ["", "Paper, Table 2 (AlexNet, full budget), VOC cls / det / seg: "
                  + "; ".join(f"{ROW_TITLES[r]} {' / '.join(map(str, v))}" for r, v in PAPER.items())]
    return "\n".join(lines)


def plot(cells: dict[str, dict], rows: list[str], columns: list[str], path: Path, title: str) -> None:
    """Score against pretraining images seen, one panel per column, one line per row (random rows dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(cells)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    most = max((k[1] for k in stats), default=1) or 1
    for ax, column in zip(axes[0], columns):
        for i, r in enumerate(rows):
            pts = sorted((k[1], v) for k, v in stats.items() if k[0] == r and k[2] == column)
            if not pts:
                continue
            color = f"C{i}"
            if len(pts) == 1 and pts[0][0] == 0:  # an initialisation: a level to beat
                mean, std, _ = pts[0][1]
                ax.axhline(mean, color=color, ls="--", label=ROW_TITLES.get(r, r))
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
                continue
            xs = [x for x, _ in pts]
            ax.errorbar(xs, [s[0] for _, s in pts], yerr=[s[1] for _, s in pts], marker="o", color=color,
                        capsize=3, label=ROW_TITLES.get(r, r))
        ax.set_xlim(0, most * 1.05)
        ax.set_title(f"{column} ({METRIC[column]})")
        ax.set_xlabel("pretraining images seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def _parse_row_flags(items: list[str], what: str) -> dict[str, list[str]]:
    parsed = {}
    for item in items or []:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise StudyError(f"{what} {item!r}: expected NAME=\"--flag value ...\"")
        parsed[name.strip()] = shlex.split(flags)
    return parsed


def build_rows(args: argparse.Namespace) -> dict[str, list[str] | None]:
    rows = {r: (None if ROWS[r] is None else list(ROWS[r])) for r in ROWS}
    added = _parse_row_flags(args.add_row, "--add-row")
    clash = sorted(set(added) & set(rows))
    if clash:
        raise StudyError(f"--add-row {clash[0]!r} is a built-in row; use --pretrain-override to change it")
    rows.update(added)
    for name, flags in _parse_row_flags(args.pretrain_override, "--pretrain-override").items():
        if name not in rows or rows[name] is None:
            raise StudyError(f"--pretrain-override {name!r}: not a pretrained row ({', '.join(rows)})")
        rows[name] = rows[name] + flags  # later flags win in argparse
    wanted = args.rows or [*ROWS, *added]
    unknown = [r for r in wanted if r not in rows]
    if unknown:
        raise StudyError(f"--rows {unknown[0]!r} is not a row ({', '.join(rows)})")
    return {r: rows[r] for r in wanted}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    p.add_argument("--output-dir", help="default: runs/table2-<budget>")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "imagenette-train",
                   help="images in one sub-folder per class: pretraining and ImageFolder transfer")
    p.add_argument("--voc-root", type=Path, default=DEFAULT_DATA / "voc2012-subset", help="VOCdevkit for VOC columns")
    p.add_argument("--rows", nargs="+", help=f"rows to run (default: {', '.join(ROWS)} and every --add-row)")
    p.add_argument("--columns", nargs="+", choices=COLUMNS, help="default: the budget's")
    p.add_argument("--milestones", type=int, nargs="+", help="pretraining steps to score at (default: the budget's)")
    p.add_argument("--add-row", action="append", metavar='NAME="FLAGS"',
                   help="a pretraining row with these ce_pretrain.train flags, e.g. ce-l1=\"--mask random-region "
                        "--loss l1\"")
    p.add_argument("--pretrain-override", action="append", metavar='ROW="FLAGS"',
                   help="append ce_pretrain.train flags to a row, e.g. ce-region=\"--lr 1e-3\"")
    p.add_argument("--rescale", action="store_true", help="Krähenbühl rescaling before every ImageFolder transfer")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="on a GPU; default: the budget's")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpu-threads", type=int,
                   help="torch threads here and in the pretraining processes (on a loaded, shared CPU 1 can be "
                        "several times faster than 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        budget = BUDGETS[args.budget]
        if args.milestones:
            if any(m < 1 for m in args.milestones):
                raise StudyError("--milestones must be at least 1")
            budget = dataclasses.replace(budget, milestones=tuple(sorted(set(args.milestones))))
        rows = build_rows(args)
        columns = tuple(args.columns or budget.columns)
        if any(c in VOC for c in columns) and not Path(args.voc_root).is_dir():
            raise StudyError(f"--voc-root {str(args.voc_root)!r} does not exist (needed by the VOC columns)")
        out = Path(args.output_dir or f"runs/table2-{args.budget}")
        out.mkdir(parents=True, exist_ok=True)
        manifest = prepare_data(Path(args.data), out / "data", budget)
    except StudyError as err:
        print(f"table2.py: error: {err}", file=sys.stderr)
        return 2
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)  # inherited by the pretraining processes
    study = Study(out=out, budget_name=args.budget, budget=budget, rows=rows, columns=columns, seeds=args.seeds,
                  cells=load_cells(out))
    env = _environment(args)
    study.meta = {"environment": env, "data": manifest,
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    started = time.time()
    print(f"feature study, budget {args.budget}: {len(rows)} rows × {len(columns)} columns × {len(args.seeds)} "
          f"seed(s) on {env['device']}; {manifest['train_images']} train / {manifest['val_images']} val images "
          f"({manifest['megabytes']} MB); {len(study.cells)} cell(s) already done", flush=True)
    try:
        run_study(study, args, out / "data", log=lambda s: print(s, flush=True))
    except StudyError as err:
        print(f"table2.py: error: {err}", file=sys.stderr)
        return 1
    minutes = (time.time() - started) / 60
    study.meta["minutes_this_run"] = round(minutes, 1)
    study.save()
    header = (f"Feature study, budget `{args.budget}`: {budget.backbone} pretrained at {budget.image_size} px, batch "
              f"{budget.batch_size}, on {manifest['train_images']} images of `{manifest['source']}`; transfer at "
              f"{budget.transfer_size} px, tested on {manifest['val_images']} held-out images; seeds "
              f"{' '.join(map(str, args.seeds))} (mean ± std); {env['device']}, torch {env['torch']}, timm "
              f"{env['timm']}; {study.meta['date']}; {minutes:.0f} min this run.")
    table = format_table(study.cells, list(rows), list(columns), header)
    write_text_atomic(out / "table2.md", table + "\n")
    plot(study.cells, list(rows), list(columns), out / "table2.png",
         f"budget {args.budget}, {budget.backbone}, {env['device']}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
