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
    python benchmarks/table2.py --budget cpu --pretrain-jobs 2 --transfer-jobs 2 --cpu-threads 1  # 2 CPU cores

Writes ``results.json`` (every cell, written after each), ``table2.md`` and ``table2.png``. A finished cell is never
recomputed: rerun the same command after a crash and it continues (pretraining, and a fine-tuning or VOC cell,
resumes from its checkpoint).
Ablations: ``--add-row NAME="TRAIN FLAGS"`` adds a pretraining row (flags of ``python -m ce_pretrain.train``, e.g.
``--add-row ce-rrc-cos="--augment rrc+jitter --lr-schedule cosine --warmup-steps 250"``), ``--pretrain-override
ROW="FLAGS"`` changes a row; a row's cells are keyed by its flags, so new flags never reuse old cells; see
docs/feature-study.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.checkpoint import RunLock
from ce_pretrain.config import ConfigError
from transfer.common.cli import RunInterrupted
from transfer.study.budgets import BUDGETS, COLUMNS, ROWS, VOC, Budget, StudyError, prepare_data
from transfer.study.cells import (
    Study,
    check_row_flags,
    check_same_settings,
    environment,
    load_cells,
    run_study,
    stop_children,
    wait_children,
)
from transfer.study.report import format_table, mixed_environments, plot

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _parse_row_flags(items: list[str], what: str) -> dict[str, list[str]]:
    parsed = {}
    for item in items or []:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise StudyError(f"{what} {item!r}: expected NAME=\"--flag value ...\"")
        try:
            parsed[name.strip()] = shlex.split(flags)
        except ValueError as err:  # e.g. an unclosed quote
            raise StudyError(f"{what} {item!r}: {err}") from None
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
    p.add_argument("--add-row", "--ablate", action="append", metavar='NAME="FLAGS"',
                   help="a pretraining row with these ce_pretrain.train flags, e.g. ce-l1=\"--mask random-region "
                        "--loss l1\"")
    p.add_argument("--pretrain-override", action="append", metavar='ROW="FLAGS"',
                   help="append ce_pretrain.train flags to a row, e.g. ce-region=\"--lr 1e-3\"")
    p.add_argument("--rescale", action="store_true", help="Krähenbühl rescaling before every ImageFolder transfer")
    p.add_argument("--labels-per-class", type=int, metavar="N",
                   help="ImageFolder columns with only N labelled training images per class (a draw fixed by the "
                        "seed; the test images stay the same): the few-label regime. Default: every training image")
    p.add_argument("--finetune-steps", type=int, metavar="N",
                   help="fine-tuning steps of the finetune column (default: the budget's); fewer suit fewer labels")
    p.add_argument("--unlabeled-per-class", type=int, metavar="N",
                   help="pretrain on up to N more images per class besides the training images (from --data, never "
                        "the test images; the classifiers still see the training images only): self-supervised "
                        "pretraining on more images than are labelled. Default: the training images only")
    p.add_argument("--every-milestone", action="store_true",
                   help="score the fine-tuning and VOC columns at every milestone too, for a trace of score against "
                        "images seen in the columns that decide (default: at the last milestone only; the probes "
                        "always score at every one); one more transfer run per milestone and row")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="on a GPU; default: the budget's")
    p.add_argument("--pretrain-jobs", type=int, default=1, metavar="N",
                   help="pretraining runs at once, before the transfer cells: small runs leave a GPU mostly idle, "
                        "so several rows and seeds can share it (on a CPU they share its cores)")
    p.add_argument("--transfer-jobs", type=int, default=1, metavar="N",
                   help="transfer cells at once, each in its own process, after every pretraining has run (a "
                        "fine-tuning run at the small budget leaves a GPU mostly idle too); their output goes to "
                        "OUTPUT_DIR/cells/<cell>.log")
    p.add_argument("--data-cache", choices=["auto", "on", "off"], default="auto",
                   help="pretrain from training images decoded once (train.py --data-cache; crops and flips on the "
                        "device); auto: on a GPU, where a few JPEG-decoding loader processes would bound the step")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the budget's data split (OUTPUT_DIR/data, links to --data) and exit: `tar -chf` of "
                        "that folder is the study's whole image set, to ship to a GPU machine")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpu-threads", type=int,
                   help="torch threads here and in the pretraining processes (on a loaded, shared CPU 1 can be "
                        "several times faster than 2)")
    return p.parse_args(argv)


def _unlabeled(manifest: dict) -> str:
    """`` + N unlabeled (M MB) for pretraining`` where the split has such images, else nothing."""
    if not manifest.get("unlabeled_images"):
        return ""
    return f" + {manifest['unlabeled_images']} unlabeled ({manifest['unlabeled_megabytes']} MB) for pretraining"


def pretrained_on(manifest: dict) -> str:
    """How many images pretraining reads, for the table header."""
    if not manifest.get("unlabeled_images"):
        return str(manifest["train_images"])
    return (f"{manifest['train_images'] + manifest['unlabeled_images']} ({manifest['train_images']} labelled + "
            f"{manifest['unlabeled_images']} unlabeled)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        budget = BUDGETS[args.budget]
        for flag in ("pretrain_jobs", "transfer_jobs", "labels_per_class", "finetune_steps", "unlabeled_per_class"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise StudyError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if args.milestones:
            if any(m < 1 for m in args.milestones):
                raise StudyError("--milestones must be at least 1")
            budget = dataclasses.replace(budget, milestones=tuple(sorted(set(args.milestones))))
        rows = build_rows(args)
        for name, flags in rows.items():  # a typo in a row's flags fails now, not when its pretraining starts
            if flags is not None and (args.rows is None or name in args.rows):
                check_row_flags(name, flags, budget, args.cpu)
        columns = tuple(args.columns or budget.columns)
        if any(c in VOC for c in columns) and not Path(args.voc_root).is_dir():
            raise StudyError(f"--voc-root {str(args.voc_root)!r} does not exist (needed by the VOC columns)")
        out = Path(args.output_dir or f"runs/table2-{args.budget}")
        out.mkdir(parents=True, exist_ok=True)
        # one study per folder: two would rewrite each other's results.json and data split
        lock = RunLock(out).acquire()
    except (StudyError, ConfigError) as err:
        print(f"table2.py: error: {err}", file=sys.stderr)
        return 2
    try:
        return run(args, budget, rows, columns, out)
    finally:
        lock.release()


def run(args: argparse.Namespace, budget: Budget, rows: dict[str, list[str] | None], columns: tuple[str, ...],
        out: Path) -> int:
    """The study in ``out``, which :func:`main` has checked and locked."""
    transfer = {"rescale": args.rescale, "labels_per_class": args.labels_per_class,
                "finetune_steps": args.finetune_steps}
    pretraining = {"unlabeled_per_class": args.unlabeled_per_class}
    try:
        check_same_settings(out, {**transfer, **pretraining})
        manifest = prepare_data(Path(args.data), out / "data", budget, args.unlabeled_per_class or 0)
    except StudyError as err:
        print(f"table2.py: error: {err}", file=sys.stderr)
        return 2
    if args.prepare_only:
        print(f"{out / 'data'}: {manifest['train_images']} train / {manifest['val_images']} val images of "
              f"{len(manifest['classes'])} classes, {manifest['megabytes']} MB{_unlabeled(manifest)} (links into "
              f"{manifest['source']})")
        return 0
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)  # inherited by the pretraining processes
    study = Study(out=out, budget_name=args.budget, budget=budget, rows=rows, columns=columns, seeds=args.seeds,
                  cells=load_cells(out), every_milestone=args.every_milestone)
    env = environment(args)
    study.meta = {"environment": env, "data": manifest, "rescale": args.rescale, "transfer": transfer,
                  "pretraining": pretraining,
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    started = time.time()
    print(f"feature study, budget {args.budget}: {len(rows)} rows × {len(columns)} columns × {len(args.seeds)} "
          f"seed(s) on {env['device']}; {manifest['train_images']} train / {manifest['val_images']} val images "
          f"({manifest['megabytes']} MB){_unlabeled(manifest)}; {len(study.cells)} cell(s) already done", flush=True)
    terminated = []

    def stop(signum, frame):  # a kill of the study reaches its training processes, which checkpoint and stop
        terminated.append(stop_children(signum))
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run_study(study, args, out / "data", log=lambda s: print(s, flush=True))
    except StudyError as err:
        print(f"table2.py: error: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, RunInterrupted) as err:  # the latter: an in-process cell saved its checkpoint
        # Ctrl-C reaches every process of the terminal's group; a plain `kill` of this one reaches only it
        stopped = terminated[0] if terminated else stop_children(signal.SIGINT)
        wait_children()  # each saves its checkpoint before the study exits
        print(f"table2.py: stopped{f' ({stopped} running process(es) told to save and stop)' if stopped else ''}; "
              "rerun the same command to continue (finished cells are kept; pretraining and fine-tuning resume from "
              "their checkpoints)", file=sys.stderr)
        return getattr(err, "exit_code", 143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    minutes = (time.time() - started) / 60
    study.meta["minutes_this_run"] = round(minutes, 1)
    study.save()
    threads = f", {env['threads']} CPU thread{'s' * (env['threads'] != 1)}" if "threads" in env else ""
    header = (f"Feature study, budget `{args.budget}`: {budget.backbone} pretrained at {budget.image_size} px, batch "
              f"{budget.batch_size}, on {pretrained_on(manifest)} images of `{manifest['source']}`; transfer at "
              f"{budget.transfer_size} px, tested on {manifest['val_images']} held-out images; seeds "
              f"{' '.join(map(str, args.seeds))} (mean ± std); "
              f"{'every row rescaled (Krähenbühl) before transfer; ' if args.rescale else ''}"
              f"{f'{args.labels_per_class} labelled images per class; ' if args.labels_per_class else ''}"
              f"{f'fine-tuned {args.finetune_steps} steps; ' if args.finetune_steps else ''}"
              f"{env['device']}, torch {env['torch']}, timm "
              f"{env['timm']}{threads}; "
              f"{study.meta['date']}; {minutes:.0f} min this run.")
    cells = study.current_cells()
    header += mixed_environments(cells, env)
    table = format_table(cells, list(rows), list(columns), header)
    write_text_atomic(out / "table2.md", table + "\n")
    plot(cells, list(rows), list(columns), out / "table2.png",
         f"budget {args.budget}, {budget.backbone}, {env['device']}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
