"""Train and evaluate an mmseg FCN over a pretrained encoder on PASCAL VOC2012 + SBD, with mmseg's own
``PascalVOCDataset`` and ``IoUMetric``.

    python -m transfer.mmseg.train --model DIR_OR_HUB_ID --data-root VOCdevkit --output-dir runs/mmseg \\
        [--holdout 0.2] [--max-iters N] [--config transfer/mmseg/configs/fcn_timm_voc12aug.py] \\
        [--cfg-options KEY=VALUE ...]
    torchrun --nproc-per-node 8 -m transfer.mmseg.train ... --launcher pytorch      # several GPUs

The encoder is converted into ``<output-dir>/encoder_mmseg.pth`` and loaded strictly; the head's input channels,
the crop size and the pixel mean/std (the encoder's, × 255, RGB) are set from the checkpoint. The test split
(VOC2012 ``val``, or with ``--holdout`` a held-out part of the official ``train`` masks) is evaluated once, after
training: there is no validation loop, since VOC's validation split is its test split.

A run never clobbers another: an output folder holding mmengine checkpoints is refused unless ``--resume``
continues it or ``--overwrite`` starts afresh (deleting them), and a lock keeps two runs out of one folder. SIGINT /
SIGTERM and ``--max-time`` end training after the current iteration with a checkpoint that ``--resume`` continues
from (no test then); a signal exits with 128 + its number, ``--max-time`` with 0. mmengine's checkpoints are read
back with ``torch.load(weights_only=True)``, allowing only the plain mmengine/numpy types they hold.
"""

from __future__ import annotations

import argparse
import numbers
import os
import pickle
import sys
import time
from pathlib import Path

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.stopping import StopRequest, agreed
from transfer.common.checkpoint import load_encoder
from transfer.common.cli import (
    OneLineParser,
    RunInterrupted,
    UsageError,
    add_common_args,
    check_positive,
    claim_output_dir,
    run_main,
    stop_message,
)
from transfer.common.voc import VOCLayoutError, holdout_split, resolve_voc_dir

from .convert import convert

__all__ = ["CONFIG", "RUN_MARKERS", "build_config", "format_metrics", "run", "stop_hook"]

CONFIG = Path(__file__).resolve().parent / "configs" / "fcn_timm_voc12aug.py"
# what training leaves in the output folder (--overwrite deletes exactly these)
RUN_MARKERS = ("last_checkpoint", "iter_*.pth")
# iterations between the all-reduces by which several processes agree to stop (one process checks every iteration)
STOP_SYNC_EVERY = 20


def format_metrics(metrics: dict) -> str:
    """``mIoU 61.20 aAcc 90.10 ...``: every scalar metric (``IoUMetric`` returns numpy floats)."""
    return " ".join(f"{k} {float(v):.2f}" for k, v in metrics.items() if isinstance(v, numbers.Real))


def _ann_path(ds) -> Path:
    path = Path(ds.ann_file)
    return path if path.is_absolute() else Path(ds.data_root) / path


def _read_ids(ds) -> list[str]:
    path = _ann_path(ds)
    if not path.is_file():
        raise VOCLayoutError(f"split file {str(path)!r} does not exist (a folder without a test list: --holdout F)")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VOCLayoutError(f"split file {str(path)!r} is empty")
    return ids


def _hold_out(cfg, train_sets: list, fraction: float, seed: int, split_dir: Path) -> None:
    """Test on ``fraction`` of the first training set (the official masks, with their void border), train on
    the rest of every training set; the split files are written under ``split_dir``."""
    fit, held = holdout_split(_read_ids(train_sets[0]), fraction, seed)
    held_set = set(held)
    split_dir.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(train_sets):
        ids = fit if i == 0 else [x for x in _read_ids(ds) if x not in held_set]
        ds.ann_file = str(write_text_atomic(split_dir / f"{i}_{_ann_path(ds).stem}_fit.txt", "\n".join(ids) + "\n"))
    test = cfg.test_dataloader.dataset
    test.update(data_root=train_sets[0].data_root, data_prefix=dict(train_sets[0].data_prefix),
                ann_file=str(write_text_atomic(split_dir / "holdout.txt", "\n".join(held) + "\n")))


def build_config(args: argparse.Namespace):
    """The mmseg config with the encoder, its preprocessing, the data root and the flags filled in, then the
    ``--cfg-options`` (the user's word is final), then the splits checked (and carved with ``--holdout``).

    Raises:
        UsageError, CheckpointError, VOCLayoutError: one line for what is missing or does not fit.
    """
    from mmengine.config import Config

    check_positive(crop_size=args.crop_size, max_iters=args.max_iters)
    amp = args.mixed_precision not in (None, "no")
    if amp:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--mixed-precision {args.mixed_precision} needs a GPU (mmengine's AmpOptimWrapper)")
    cfg = Config.fromfile(args.config)
    ckpt = load_encoder(args.model)
    voc = resolve_voc_dir(args.data_root, 2012)
    work_dir = Path(args.output_dir).expanduser().resolve()  # mmseg reads a relative ann_file under data_root
    weights = convert(ckpt, work_dir / "encoder_mmseg.pth")
    channels = ckpt.create_model().feature_info[-1]["num_chs"]
    crop = (args.crop_size or ckpt.image_size,) * 2
    cfg.model.data_preprocessor = dict(cfg.data_preprocessor, mean=[m * 255 for m in ckpt.mean],
                                       std=[s * 255 for s in ckpt.std], bgr_to_rgb=True, size=crop)
    cfg.model.backbone.update(model_name=ckpt.backbone, checkpoint=str(weights))
    cfg.model.decode_head.in_channels = channels
    train = cfg.train_dataloader.dataset
    train_sets = list(train.datasets) if train.type == "ConcatDataset" else [train]
    for ds in [*train_sets, cfg.test_dataloader.dataset]:
        ds.data_root = str(voc)
        for step in ds.pipeline:
            if step["type"] == "RandomCrop":
                step["crop_size"] = crop
    # the test split is VOC's val split: validating on it during training would evaluate it twice
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=args.seed)
    # --resume: the latest checkpoint in the output dir (mmengine's resume=True), or the one given
    cfg.resume = args.resume is not None
    if args.resume not in (None, "latest"):
        cfg.load_from = args.resume
    cfg.launcher = args.launcher
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        loader.update(num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    if amp:
        cfg.optim_wrapper.update(type="AmpOptimWrapper", dtype={"fp16": "float16", "bf16": "bfloat16"}[
            args.mixed_precision])
    if args.max_iters:
        cfg.train_cfg.max_iters = args.max_iters
        cfg.param_scheduler[0]["end"] = args.max_iters
        cfg.default_hooks.checkpoint.interval = args.max_iters
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    train = cfg.train_dataloader.dataset
    train_sets = list(train.datasets) if train.type == "ConcatDataset" else [train]
    if args.holdout:
        _hold_out(cfg, train_sets, args.holdout, args.seed, work_dir / "splits")
    for ds in [*train_sets, cfg.test_dataloader.dataset]:
        _read_ids(ds)  # one clear line now rather than a traceback from inside mmengine's dataset build
    return cfg


def stop_hook(stop: StopRequest):
    """An mmengine hook that ends training after the iteration in which ``stop`` asks for it (agreed by every
    process): it saves ``iter_<N>.pth`` with optimiser and schedulers, points ``last_checkpoint`` at it (which
    ``--resume`` reads) and sets the loop's ``stop_training``. Its ``code`` is then the stop code."""
    from mmengine.dist import barrier, is_main_process
    from mmengine.hooks import Hook

    class StopHook(Hook):
        priority = "LOWEST"  # after the optimiser step and every other hook's bookkeeping

        def __init__(self):
            self.code, self.checkpoint = 0, None

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            done = runner.iter + 1
            if done >= runner.max_iters:
                return
            device = next(runner.model.parameters()).device
            self.code = agreed(stop, device, sync=done % STOP_SYNC_EVERY == 0)
            if not self.code:
                return
            self.checkpoint = Path(runner.work_dir) / f"iter_{done}.pth"
            staging = f".tmp-{os.getpid()}-{self.checkpoint.name}"  # renamed once whole: a kill mid-save loses nothing
            runner.save_checkpoint(runner.work_dir, staging, by_epoch=False)  # meta "iter" = done: resume starts there
            if is_main_process():  # mmengine's resume=True reads the path in last_checkpoint
                os.replace(Path(runner.work_dir) / staging, self.checkpoint)
                write_text_atomic(Path(runner.work_dir) / "last_checkpoint", str(self.checkpoint))
            barrier()
            runner.train_loop.stop_training = True

    return StopHook()


def _safe_checkpoint_types() -> list:
    """What mmengine's own checkpoints hold beyond tensors and builtins, for ``torch.load(weights_only=True)``: its
    log history (``HistoryBuffer``, which pickles its statistics methods as ``getattr(HistoryBuffer, "min")``) and
    numpy arrays and scalars. ``getattr`` itself is never allowed (it reaches anything); a stand-in answers exactly
    those lookups and refuses every other."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    statistics = {"min", "max", "current", "mean"}

    def history_method(owner, name: str):
        if owner is HistoryBuffer and name in statistics | set(HistoryBuffer._statistics_methods):
            return getattr(owner, name)
        raise pickle.UnpicklingError(f"refusing getattr({owner!r}, {name!r}) in a checkpoint")

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    dtypes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    return [HistoryBuffer, np.ndarray, np.dtype, core._reconstruct, core.scalar, *dtypes,
            (history_method, "builtins.getattr")]


def run(cfg, max_time: float | None = None, started: float | None = None) -> dict:
    """Train, then evaluate once on the test split; returns mmseg's metrics (``{"mIoU": ..., "aAcc": ...}``).

    Args:
        cfg: :func:`build_config`'s config.
        max_time: seconds after ``started`` (``time.monotonic()``, default now) at which training stops cleanly.

    Returns:
        the metrics; ``{}`` when ``--max-time`` stopped training (no test then).

    Raises:
        RunInterrupted: SIGINT / SIGTERM stopped training, after the checkpoint was saved.
    """
    import torch
    from mmengine.dist import is_main_process
    from mmengine.runner import Runner

    with StopRequest(max_time, start=started) as stop, torch.serialization.safe_globals(_safe_checkpoint_types()):
        runner = Runner.from_cfg(cfg)
        hook = stop_hook(stop)
        runner.register_hook(hook)
        runner.train()
    if hook.code:
        if is_main_process():
            print(f"python -m transfer.mmseg.train: "
                  f"{stop_message(hook.code, runner.iter, runner.max_iters, hook.checkpoint)}", file=sys.stderr,
                  flush=True)
        if hook.code > 1:
            raise RunInterrupted("", hook.code)
        return {}
    return runner.test()


def build_parser() -> argparse.ArgumentParser:
    """The shared transfer flags (``--model``, ``--output-dir``, ``--num-workers``, ``--mixed-precision``,
    ``--seed``, ``--resume``), mmseg's (``--config``, ``--launcher``, ``--cfg-options``) and the data's."""
    from mmengine.config import DictAction

    p = OneLineParser(prog="python -m transfer.mmseg.train", description=__doc__.split("\n\n")[0])
    add_common_args(p, output_dir="runs/mmseg", only={"model", "output_dir", "num_workers", "mixed_precision", "seed",
                                                        "resume", "overwrite", "max_time"})
    p.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC2012 itself)")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--holdout", type=float, default=0.0,
                   help="test on this fraction held out of the first training split (for folders without val)")
    p.add_argument("--crop-size", type=int, help="training crop (default: the pretraining size)")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="mmengine's launcher: pytorch under torchrun, slurm under srun")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="KEY=VALUE config overrides (applied last)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Bad input (flags, data, weights, config): one line on stderr, exit status 2, before any training."""
    try:
        import mmcv.ops  # noqa: F401  (mmseg's models import them; mmcv-lite lacks them)
        import mmseg  # noqa: F401
    except ImportError as err:
        print(f"python -m transfer.mmseg.train: error: {err}; install mmsegmentation and mmcv with its ops "
              "(docs/transfer.md)", file=sys.stderr)
        return 2

    def checked_run(args: argparse.Namespace) -> None:
        started = time.monotonic()
        # before build_config writes the converted encoder into it
        with claim_output_dir(args.output_dir, resume=args.resume is not None, overwrite=args.overwrite,
                              markers=RUN_MARKERS):
            try:
                cfg = build_config(args)
            except (OSError, ValueError, KeyError) as err:
                raise UsageError(str(err) or type(err).__name__) from None
            metrics = run(cfg, args.max_time, started)
        from mmengine.dist import is_main_process

        if metrics and is_main_process():
            print(format_metrics(metrics))

    return run_main(build_parser(), checked_run, argv)


if __name__ == "__main__":
    sys.exit(main())
