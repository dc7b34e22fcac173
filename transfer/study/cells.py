"""The cells of the feature study: pretraining or initialising a row, one transfer run per cell, and resume.

A cell is one (row, seed, pretraining images seen, column) score; ``run_study`` fills the missing ones and saves
``results.json`` after each, so a rerun after a crash recomputes nothing that is finished. A row is identified by
its name and, unless it is a built-in row with its built-in flags, by its pretraining flags too (:func:`row_id`):
an ablation row given other flags under the same name is a new row, never mixed with the cells of the old one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.checkpoint import latest_checkpoint, read_run_json
from ce_pretrain.config import ConfigError
from ce_pretrain.stopping import PARENT_ENV
from transfer.study.budgets import (
    IMAGEFOLDER,
    METRIC,
    ROWS,
    Budget,
    StudyError,
    pretraining_folder,
    row_batch_size,
    row_image_size,
)


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
    from ce_pretrain.rescale import gaussian_init_

    if not (dst / "model.safetensors").is_file():
        torch.manual_seed(seed)
        model = timm.create_model(budget.backbone, pretrained=False, num_classes=0)
        if row == "random-gaussian":
            gaussian_init_(model, std=0.01, seed=seed)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _save_timm_folder(model, budget.backbone, budget.image_size, dst, row)
    return dst


def row_id(row: str, flags: list[str] | None, budget: Budget) -> str:
    """The name under which a row's cells and pretraining runs are stored.

    A built-in row with its built-in flags (and any initialisation row) keeps its name; any other pretrained row
    gets ``NAME@HASH``, a hash of its flags, so that changing a row's flags never reuses what the old flags
    computed. A cosine schedule ends at the last milestone, so for such rows the hash covers that too.
    """
    if flags is None or flags == ROWS.get(row):
        return row
    text = shlex.join(flags)
    if any("cosine" in f for f in flags):
        text += f" --schedule-steps {budget.milestones[-1]}"
    return f"{row}@{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


def uses_data_cache(args: argparse.Namespace) -> bool:
    """Whether pretraining reads the decoded cache (``--data-cache``): ``on``, or ``auto`` on a GPU, where JPEG
    decoding in a few loader processes would otherwise bound the step."""
    return args.data_cache == "on" or (args.data_cache == "auto" and not args.cpu and torch.cuda.is_available())


def cache_path(out: Path, image_size: int) -> Path:
    """The decoded training images for pretraining at ``image_size`` (inside the split, so a new split drops it)."""
    return out / "data" / f"cache-{image_size}px.npy"


def build_caches(study: Study, args: argparse.Namespace, data: Path, rows: list[list[str]]) -> None:
    """Decode the training images once per image size of the pretraining ``rows`` (their flags), before any
    pretraining process starts (several starting together would each decode them)."""
    from ce_pretrain.data import ImageDataset
    from ce_pretrain.gpu_data import open_cache
    from ce_pretrain.sources import open_source

    items, column, _ = open_source(str(pretraining_folder(data)))
    for size in sorted({row_image_size(flags, study.budget) for flags in rows}):
        open_cache(ImageDataset(items, size, image_column=column), cache_path(study.out, size),
                   num_workers=args.num_workers)


def snapshot_path(row: str, flags: list[str], budget: Budget, seed: int, steps: int, out: Path) -> Path:
    """Where the encoder of ``row`` after ``steps`` pretraining steps is kept."""
    return out / "pretrain" / row_id(row, flags, budget) / f"seed{seed}" / f"encoder-step{steps}"


def check_row_flags(row: str, flags: list[str], budget: Budget, cpu: bool) -> None:
    """Refuse, in one line, flags of a pretrained row that ``python -m ce_pretrain.train`` would refuse (an unknown
    flag, a bad value, a combination it does not allow), before the study starts rather than when the row's turn
    comes, hours later. Nothing is built and no data is read."""
    from ce_pretrain.config import build_parser, resolve_config

    def refuse(message: str):
        raise StudyError(f"row {row!r}: {message}")

    parser = build_parser()
    parser.error = refuse  # argparse's errors, as one StudyError instead of an exit
    steps = str(budget.milestones[-1])
    argv = ["--preset", "features", "--backbone", budget.backbone, "--image-size", str(budget.image_size),
            "--batch-size", str(budget.batch_size), "--max-steps", steps, "--schedule-steps", steps, *flags]
    try:
        resolve_config(parser.parse_args(argv + (["--cpu"] if cpu or not torch.cuda.is_available() else [])))
    except ConfigError as err:
        refuse(str(err))


def pretrain(row: str, flags: list[str], budget: Budget, seed: int, steps: int, args: argparse.Namespace,
             out: Path, data: Path) -> Path:
    """The encoder of ``row`` after ``steps`` pretraining steps (``python -m ce_pretrain.train``, resumed).

    The run is extended milestone by milestone (``--resume`` with a larger ``--max-steps``); its learning-rate
    schedule spans the last milestone (``--schedule-steps``), so each stage continues the same schedule.
    """
    snap = snapshot_path(row, flags, budget, seed, steps, out)
    run_dir = snap.parent
    if (snap / "model.safetensors").is_file():
        return snap
    latest = latest_checkpoint(run_dir)
    try:
        reached = read_run_json(latest)["step"] if latest is not None else 0
    except ConfigError:
        reached = 0  # a damaged checkpoint: train.py --resume names it in one line
    if reached > steps:
        # train.py would resume at `reached` and stop at once: its encoder is not the one after `steps` steps
        raise StudyError(f"pretraining {row} (seed {seed}) in {run_dir} is at step {reached}, past milestone {steps}, "
                         "whose encoder was not kept; score that milestone in another --output-dir")
    cmd = [sys.executable, "-m", "ce_pretrain.train", "--preset", "features", "--backbone", budget.backbone,
           "--image-size", str(budget.image_size), "--batch-size", str(budget.batch_size), "--max-steps", str(steps),
           "--data", str(data), "--seed", str(seed), "--output-dir", str(run_dir), "--num-workers",
           str(args.num_workers), "--checkpoint-every", str(max(100, steps // 4)), "--keep-checkpoints", "1",
           "--sample-every", str(10**9), "--log-every", str(max(1, min(50, steps))),
           "--schedule-steps", str(budget.milestones[-1]),
           *(["--data-cache", str(cache_path(out, row_image_size(flags, budget)))] if uses_data_cache(args) else []),
           *flags]
    if args.cpu:
        cmd.append("--cpu")
    elif torch.cuda.is_available():
        cmd += ["--mixed-precision", args.mixed_precision or budget.mixed_precision]
    # the folder already holds pretrain.log (and earlier snapshots), which train.py refuses without one of these;
    # --overwrite deletes only a run's own outputs, so the log and the encoder-step* snapshots stay
    cmd.append("--resume" if (run_dir / "checkpoints").is_dir() else "--overwrite")
    log = run_dir / "pretrain.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        code = _run_child(cmd, f)
    if code:
        raise StudyError(f"pretraining {row} (seed {seed}) to step {steps} failed (exit {code}); see {log}")
    tmp = snap.with_name(f".{snap.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "timm-encoder", tmp)
    os.replace(tmp, snap)
    return snap


_CHILDREN: set[subprocess.Popen] = set()  # the study's live pretraining and cell processes


def _run_child(cmd: list[str], output) -> int:
    """Run ``cmd`` to its end with its output in ``output``; :func:`stop_children` can reach it meanwhile."""
    # PARENT_ENV: if this study dies, even by kill -9, the child gets SIGTERM (saves a checkpoint, stops) rather
    # than training on as an orphan that holds its folder's lock when the study is rerun
    child = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT,
                             env={**os.environ, PARENT_ENV: str(os.getpid())})
    _CHILDREN.add(child)
    code = child.wait()  # a stopping study interrupts this wait, and leaves the child to wait_children()
    _CHILDREN.discard(child)
    return code


def stop_children(signum: int = signal.SIGTERM) -> int:
    """Pass ``signum`` on to every live pretraining and cell process (each saves a checkpoint and stops, so a rerun
    resumes it); returns how many were signalled."""
    live = [c for c in list(_CHILDREN) if c.poll() is None]
    for child in live:
        child.send_signal(signum)
    return len(live)


def wait_children() -> None:
    """Wait until every pretraining and cell process has ended (after :func:`stop_children`: saved its checkpoint)."""
    for child in list(_CHILDREN):
        child.wait()
        _CHILDREN.discard(child)


def _voc_cell(column: str, source: str, budget: Budget, args: argparse.Namespace, seed: int, cell_dir: Path) -> dict:
    """One VOC run with the entry point's config dataclass (fields it lacks are left out)."""
    if column == "voc-cls":
        from transfer.classification.train import ClassificationConfig as Config
        from transfer.classification.train import run
        kw = {"holdout": 0.2, "image_size": budget.voc_size, "max_steps": budget.voc_steps[0], "batch_size": 32}
        key = "mAP"
    elif column == "voc-det":
        from transfer.torchvision_det.train import DetectionConfig as Config
        from transfer.torchvision_det.train import run
        kw = {"holdout": 0.2, "min_size": budget.voc_size, "max_size": int(budget.voc_size * 5 / 3),
              "max_steps": budget.voc_steps[1], "batch_size": 2, "test_proposals": 300}
        key = "mAP"
    else:
        from transfer.torchvision_seg.train import SegmentationConfig as Config
        from transfer.torchvision_seg.train import run
        kw = {"train_split": "aug", "test_split": "train", "crop_size": budget.voc_size,
              "max_steps": budget.voc_steps[2], "batch_size": 8}
        key = "mIoU"
    kw.update(model=source, data_root=str(args.voc_root), year=2012, seed=seed, workers=args.num_workers,
              num_workers=args.num_workers, output_dir=str(cell_dir), cpu=args.cpu,
              mixed_precision=None if args.cpu else (args.mixed_precision or budget.mixed_precision))
    result = _run_cell(run, Config, kw, cell_dir)
    return {"score": result[key], "steps": result.get("steps")}


def _run_cell(run, config_class, kw: dict, cell_dir: Path) -> dict:
    """``run(config_class(**kw))``, with only the fields the entry point's config has. A cell resumes what an
    interrupted study left in ``cell_dir`` (a fine-tuning or VOC run's last checkpoint, a probe's finished stages,
    or a finished ``results.json``), and starts over if that was run with other settings."""
    from transfer.common.cli import UsageError
    from transfer.common.snapshot import latest_checkpoint
    from transfer.imagefolder.train import PROBE_STATE

    names = {f.name for f in dataclasses.fields(config_class)}

    def attempt(**how) -> dict:
        return run(config_class(**{k: v for k, v in {**kw, **how}.items() if k in names}))

    earlier = ("results.json", PROBE_STATE)
    if "resume" in names and (latest_checkpoint(cell_dir) is not None
                              or any((cell_dir / name).is_file() for name in earlier)):
        try:
            return attempt(resume="latest", overwrite=False)
        except UsageError as err:
            print(f"{cell_dir}: {err}; starting this cell over", flush=True)
    return attempt(resume=None, overwrite=True)


def _imagefolder_cell(column: str, source: str, row: str, budget: Budget, args: argparse.Namespace, seed: int,
                      data: Path, cell_dir: Path) -> dict:
    """One ImageFolder run (fine-tune, linear probe or kNN); the Gaussian row is always rescaled first."""
    from transfer.imagefolder.train import ImageFolderConfig, run

    rescale = args.rescale or row == "random-gaussian"
    kw = {"model": source, "train": str(data / "train"), "val": str(data / "val"), "mode": column,
          "output_dir": str(cell_dir), "image_size": budget.transfer_size, "batch_size": budget.finetune_batch,
          "num_workers": args.num_workers, "seed": seed, "cpu": args.cpu,
          "mixed_precision": "no" if args.cpu else (args.mixed_precision or budget.mixed_precision),
          "rescale": rescale, "rescale_beta": 0.0 if row == "random-gaussian" else None,
          "labels_per_class": getattr(args, "labels_per_class", None),
          "max_steps": getattr(args, "finetune_steps", None) or budget.finetune_steps}
    result = _run_cell(run, ImageFolderConfig, kw, cell_dir)
    return {"score": result["top1"], "top5": result["top5"], "stage": result.get("stage"),
            "steps": result.get("steps")}


def environment(args: argparse.Namespace) -> dict:
    """Device and library versions, written into ``results.json`` and the table header."""
    import accelerate
    import timm
    import torchvision

    gpu = torch.cuda.is_available() and not args.cpu
    env = {"device": torch.cuda.get_device_name(0) if gpu else f"{platform.machine()} CPU ×{_cpus()}",
           "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version()}
    if not gpu:  # on a CPU the thread count changes the order of float sums, hence the trajectory of a run
        env["threads"] = torch.get_num_threads()  # the study has applied --cpu-threads by now
    return env


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cell_key(row: str, seed: int, images: int, column: str) -> str:
    """The ``results.json`` key of one cell; ``row`` is the row's :func:`row_id`."""
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
    every_milestone: bool = False  # fine-tuning and VOC columns at every milestone too, not only at the last

    def current_cells(self) -> dict[str, dict]:
        """The cells of this study's rows with their present flags (``results.json`` may hold others: cells of
        rows since renamed, dropped or given other flags, which the tables leave out)."""
        ids = {row_id(row, flags, self.budget) for row, flags in self.rows.items()}
        return {k: v for k, v in self.cells.items() if k.split("/", 1)[0] in ids}

    def save(self) -> None:
        payload = {"budget": self.budget_name, "budget_sizes": dataclasses.asdict(self.budget), **self.meta,
                   "rows": self.rows, "columns": list(self.columns), "seeds": self.seeds, "cells": self.cells}
        write_text_atomic(self.out / "results.json", json.dumps(payload, indent=2) + "\n")


# settings a study applies to every cell, recorded in results.json ("transfer", or "pretraining" for the
# pretraining images); cells are not keyed by them
STUDY_SETTINGS = {"rescale": "--rescale", "labels_per_class": "--labels-per-class",
                  "finetune_steps": "--finetune-steps", "unlabeled_per_class": "--unlabeled-per-class"}


def _describe(key: str, value) -> str:
    if key == "rescale":
        return f"{'with' if value else 'without'} --rescale"
    return f"{STUDY_SETTINGS[key]} {value}" if value is not None else f"without {STUDY_SETTINGS[key]}"


def check_same_settings(out: Path, settings: dict) -> None:
    """Refuse to add cells to a study in ``out`` whose cells were made with other ``settings`` (the keys of
    :data:`STUDY_SETTINGS`; ``None`` / ``False`` = the budget's default): cells are keyed by row, seed, images and
    column only, so the two would be mixed in one table (and pretraining runs would resume on other images). A
    folder from before a setting was recorded had that setting's default (``rescale`` was recorded first, at the
    top level)."""
    path = out / "results.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
        earlier = None if saved is None else {"rescale": saved.get("rescale"), **saved.get("transfer", {}),
                                              **saved.get("pretraining", {})}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return
    if earlier is None or earlier.get("rescale") is None:  # no study yet, or one older than any of these records
        return
    for key in STUDY_SETTINGS:
        before, now = earlier.get(key), settings.get(key)
        if (bool(before) != bool(now)) if key == "rescale" else before != now:
            raise StudyError(f"{out} holds a study run {_describe(key, before)}; rerun it "
                             f"{_describe(key, before)}, or give another --output-dir")


def load_cells(out: Path) -> dict[str, dict]:
    """The finished cells of an earlier run in ``out`` (none if there is no readable ``results.json``)."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("cells", {}))
    except (json.JSONDecodeError, AttributeError):
        return {}


def _missing(study: Study, row: str, flags: list[str] | None, seed: int, steps: int) -> list[str]:
    """The columns of (row, seed, ``steps`` pretraining steps) not yet in ``results.json``."""
    images = steps * row_batch_size(flags, study.budget)
    rid = row_id(row, flags, study.budget)
    return [c for c in study.columns if cell_key(rid, seed, images, c) not in study.cells
            and (c in ("linear", "knn") or study.every_milestone  # fine-tune, VOC: the final weights unless asked
                 or steps in (0, study.budget.milestones[-1]))]


def _pretraining_plan(study: Study) -> list[tuple[str, list[str], int, list[int]]]:
    """(row, flags, seed, milestones) of every pretraining run a missing cell needs: each milestone up to the last
    one needed, so that the run keeps an encoder at every milestone it passes (a later study with other columns,
    or ``--every-milestone``, scores them without pretraining again; a run cannot go back to an earlier step)."""
    milestones = study.budget.milestones
    plans = []
    for seed in study.seeds:
        for row, flags in study.rows.items():
            needed = [s for s in milestones if _missing(study, row, flags, seed, s)] if flags is not None else []
            if needed:
                plans.append((row, flags, seed, [s for s in milestones if s <= needed[-1]]))
    return plans


def pretrain_all(study: Study, args: argparse.Namespace, data: Path, plans: list, jobs: int, log=print) -> None:
    """Every pretraining of ``plans`` (:func:`_pretraining_plan`), with up to ``jobs`` processes at a time.

    Small runs leave a GPU mostly idle, so several rows (and seeds) pretrain side by side; each (row, seed) still
    goes through its milestones in order, resuming its own run. A failed run does not stop the others; the first
    failure is raised once all have ended.
    """
    budget = study.budget

    def work(row: str, flags: list[str], seed: int, steps: list[int]) -> None:
        log(f"pretraining {row} seed {seed} to step {steps[-1]}")
        for s in steps:
            started = time.time()
            pretrain(row, flags, budget, seed, s, args, study.out, pretraining_folder(data))
            log(f"pretrained {row} seed {seed} to {s * row_batch_size(flags, budget)} images "
                f"({time.time() - started:.0f} s)")

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait for the training processes
        futures = [pool.submit(work, *plan) for plan in plans]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class Cell:
    """One transfer run to do: ``key`` in ``results.json``, and the encoder folder ``source`` it starts from."""

    key: str
    row: str
    flags: list[str] | None
    seed: int
    images: int
    column: str
    source: Path


# the longest cells start first when several run at once (longest-first packs a pool of workers best)
_EXPECTED_LENGTH = {"finetune": 0, "voc-det": 1, "voc-seg": 2, "voc-cls": 3, "linear": 4, "knn": 5}


def _transfer(cell: Cell, budget: Budget, args: argparse.Namespace, data: Path, cell_dir: Path) -> dict:
    if cell.column in IMAGEFOLDER:
        return _imagefolder_cell(cell.column, str(cell.source), cell.row, budget, args, cell.seed, data, cell_dir)
    return _voc_cell(cell.column, str(cell.source), budget, args, cell.seed, cell_dir)


def _record(study: Study, cell: Cell, result: dict, seconds: float, log) -> None:
    result.update(row=cell.row, flags=cell.flags, seed=cell.seed, images=cell.images, column=cell.column,
                  seconds=round(seconds, 1))
    if study.meta.get("environment"):  # a study resumed elsewhere mixes cells of two machines: each says where
        result["environment"] = study.meta["environment"]
    study.cells[cell.key] = result
    study.save()
    log(f"{cell.key}: {METRIC[cell.column]} {result['score']:.1f}")


def cell_dir(study: Study, key: str) -> Path:
    """Where one cell's transfer run writes (its ``results.json``, logs)."""
    return study.out / "cells" / key.replace("/", "_")


# what a cell process needs of the study's command line
_CELL_ARGS = ("rescale", "labels_per_class", "finetune_steps", "cpu", "mixed_precision", "num_workers", "voc_root",
              "cpu_threads")


def run_cells(study: Study, args: argparse.Namespace, data: Path, cells: list[Cell], jobs: int, log=print) -> None:
    """Run ``cells``, each in its own process (``python -m transfer.study.cells``), up to ``jobs`` at a time.

    The cells are independent, and a small transfer run leaves a GPU (or a multi-core CPU) mostly idle. Each
    finished cell is saved to ``results.json`` at once, so a crash loses only the cells still running; a failed
    cell does not stop the others, and the first failure is raised once all have ended. A cell's output goes to
    ``cells/<key>.log``.
    """
    import threading

    lock = threading.Lock()
    spec_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in _CELL_ARGS}

    def work(cell: Cell) -> None:
        out_dir = cell_dir(study, cell.key)
        result_path = out_dir.with_name(out_dir.name + ".result.json")
        result_path.unlink(missing_ok=True)
        spec = {"cell": {**dataclasses.asdict(cell), "source": str(cell.source)}, "args": spec_args,
                "budget": dataclasses.asdict(study.budget), "data": str(data), "cell_dir": str(out_dir),
                "result": str(result_path)}
        log_path = out_dir.with_name(out_dir.name + ".log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log_path, "a") as f:
            code = _run_child([sys.executable, "-m", "transfer.study.cells", json.dumps(spec)], f)
        if code or not result_path.is_file():
            raise StudyError(f"{cell.key} failed (exit {code}); see {log_path}")
        result = json.loads(result_path.read_text())
        with lock:
            _record(study, cell, result, time.time() - started, log)
        result_path.unlink()

    ordered = sorted(cells, key=lambda c: _EXPECTED_LENGTH.get(c.column, 0))
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait for the cell processes
        futures = [pool.submit(work, cell) for cell in ordered]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def _cell_main(argv: list[str]) -> int:
    """``python -m transfer.study.cells SPEC``: one cell of :func:`run_cells` in this process."""
    spec = json.loads(argv[0])
    args = argparse.Namespace(**spec["args"])
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    budget = Budget(**spec["budget"])
    cell = Cell(**{**spec["cell"], "source": Path(spec["cell"]["source"])})
    print(f"{cell.key}: {cell.column} from {cell.source}", flush=True)
    result = _transfer(cell, budget, args, Path(spec["data"]), Path(spec["cell_dir"]))
    write_text_atomic(Path(spec["result"]), json.dumps(result) + "\n")
    print(f"{cell.key}: {METRIC[cell.column]} {result['score']:.1f}", flush=True)
    return 0


def _source(study: Study, row: str, flags: list[str] | None, seed: int, steps: int, args: argparse.Namespace,
            data: Path, log) -> Path:
    """The encoder a cell of (row, seed, ``steps``) starts from: an initialisation, or the pretraining snapshot
    (pretraining it now if it is missing)."""
    budget = study.budget
    if flags is None:
        return initialisation(row, budget, seed, study.out / "pretrain" / row / f"seed{seed}" / "init")
    started = time.time()
    done = (snapshot_path(row, flags, budget, seed, steps, study.out) / "model.safetensors").is_file()
    source = pretrain(row, flags, budget, seed, steps, args, study.out, pretraining_folder(data))
    if not done:
        log(f"pretrained {row} seed {seed} to {steps * row_batch_size(flags, budget)} images "
            f"({time.time() - started:.0f} s)")
    return source


def run_study(study: Study, args: argparse.Namespace, data: Path, log=print) -> None:
    """Fill every missing cell, saving ``results.json`` after each.

    With ``args.pretrain_jobs`` > 1 every pretraining runs first, that many at a time (:func:`pretrain_all`); with
    ``args.transfer_jobs`` > 1 every pretraining runs first too, then the cells, that many at a time
    (:func:`run_cells`). Otherwise each (row, seed, milestone) is pretrained and then scored, in turn.
    """
    budget = study.budget
    transfer_jobs = getattr(args, "transfer_jobs", 1)
    plans = _pretraining_plan(study)
    if plans and uses_data_cache(args):
        build_caches(study, args, data, [flags for _, flags, _, _ in plans])
    if plans and (args.pretrain_jobs > 1 or transfer_jobs > 1):
        pretrain_all(study, args, data, plans, args.pretrain_jobs, log)
    planned = {(row, seed): steps for row, _, seed, steps in plans}
    queued = []
    for seed in study.seeds:
        for row, flags in study.rows.items():
            rid = row_id(row, flags, budget)
            for steps in [0] if flags is None else list(budget.milestones):
                todo = _missing(study, row, flags, seed, steps)
                if not todo and steps not in planned.get((row, seed), ()):
                    continue
                source = _source(study, row, flags, seed, steps, args, data, log)  # the snapshot, kept either way
                if not todo:
                    continue
                images = steps * row_batch_size(flags, budget)
                cells = [Cell(cell_key(rid, seed, images, c), row, flags, seed, images, c, source) for c in todo]
                if transfer_jobs > 1:
                    queued += cells
                    continue
                for cell in cells:
                    started = time.time()
                    result = _transfer(cell, budget, args, data, cell_dir(study, cell.key))
                    _record(study, cell, result, time.time() - started, log)
    if queued:
        run_cells(study, args, data, queued, transfer_jobs, log)


if __name__ == "__main__":
    sys.exit(_cell_main(sys.argv[1:]))
