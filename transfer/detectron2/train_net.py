"""Train and evaluate a detectron2 detector over a pretrained encoder on PASCAL VOC, with detectron2's own
``PascalVOCDetectionEvaluator`` (VOC2007: 11-point AP at IoU 0.5).

    python -m transfer.detectron2.train_net --config-file transfer/detectron2/configs/fast_rcnn_alexnet_voc07.yaml \\
        --model DIR_OR_HUB_ID --data-root VOCdevkit --proposals-dir PROPOSALS [--holdout 0.2] [--num-gpus 8] \\
        [--eval-only] [KEY VALUE ...]

``--model`` is converted (:mod:`transfer.detectron2.convert`) into ``OUTPUT_DIR``, which also sets the input
format, pixel mean and std to the encoder's. The splits named by ``DATASETS.TRAIN`` / ``DATASETS.TEST``
(``voc_2007_trainval`` → ``trainval`` of ``--data-root`` in year ``--year``), or with ``--holdout`` a held-out part
of the training split, are registered as ``ce_voc_<year>_<split>`` (see :mod:`transfer.detectron2.datasets`);
Fast R-CNN configs read ``<proposals-dir>/voc_<year>_<split>.pkl`` (see :mod:`transfer.detectron2.proposals`).
Several GPUs or machines run through detectron2's ``launch`` (``--num-gpus``, ``--num-machines``).

A run never clobbers another: an ``OUTPUT_DIR`` holding a trained detector is refused unless ``--resume`` continues
it, ``--eval-only`` scores it or ``--overwrite`` starts afresh (deleting its checkpoints), and a lock keeps two runs
out of one folder. SIGINT / SIGTERM (to the process, or to the parent of a ``launch``, which passes it on) and
``--max-time`` end the run after the current iteration with a checkpoint that ``--resume`` continues from; a signal
exits with 128 + its number, ``--max-time`` with 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

try:
    import detectron2  # noqa: F401
except ImportError as err:
    if __name__ == "__main__":  # a command, not a library import: one line, as for any other bad setup
        print(f"python -m transfer.detectron2.train_net: error: {err}; detectron2 builds from source "
              "(docs/transfer.md)", file=sys.stderr)
        sys.exit(2)
    raise
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import register_pascal_voc
from detectron2.engine import DefaultTrainer, HookBase, default_setup, launch
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.utils import comm

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.stopping import StopRequest, agreed, forward_signals_to_children
from transfer.common.checkpoint import CheckpointError, load_encoder, load_strict
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
from transfer.common.voc import VOCLayoutError, resolve_voc_dir

from .backbone import add_timm_config
from .convert import convert
from .datasets import plan_splits, split_of, write_split_view
from .keys import BACKBONE_PREFIX, FPN_BACKBONE_PREFIX

__all__ = ["AtomicCheckpointer", "StopHook", "StoppedEarly", "Trainer", "check_encoder_fits", "load_trained", "prepare",
           "register_datasets", "run", "setup"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VIEWS = "datasets"  # OUTPUT_DIR/<VIEWS>/<dataset name>: the split folders detectron2 reads
# what a training run leaves in OUTPUT_DIR (--overwrite deletes exactly these; the converted encoder and the split
# folders are rewritten by every run)
RUN_MARKERS = ("last_checkpoint", "model_*.pth", "metrics.json", "events.out.tfevents.*")
# iterations between the all-reduces by which several processes agree to stop (one process checks every iteration)
STOP_SYNC_EVERY = 20


def check_encoder_fits(model: torch.nn.Module, weights: str) -> None:
    """Load the converted encoder into ``model``'s backbone strictly (every tensor, every shape, both ways).

    Raises:
        CheckpointError: naming the offending keys (detectron2 itself only warns and trains from random init).
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    fpn = hasattr(model.backbone, "bottom_up")
    prefix = FPN_BACKBONE_PREFIX if fpn else BACKBONE_PREFIX
    body = (model.backbone.bottom_up if fpn else model.backbone).body.model
    unexpected = sorted(k for k in state if not k.startswith(prefix) and k not in model.state_dict())
    if unexpected:
        raise CheckpointError(f"{weights} does not fit the detectron2 model: unexpected {unexpected[:4]}")
    load_strict(body, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, weights)


def load_trained(model: torch.nn.Module, weights: str) -> None:
    """Load a whole trained detector (a detectron2 checkpoint we wrote) strictly."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    load_strict(model, state.get("model", state), weights)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoints appear whole or not at all: each is written under a temporary name
    and renamed into place, and ``last_checkpoint`` (written atomically) names it only then. A run killed mid-save
    keeps its previous checkpoint; at worst a ``.tmp-*`` file is left."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        staging = f".tmp-{os.getpid()}-{name}"
        super().save(staging, **kwargs)  # detectron2's own format, under the temporary name
        os.replace(Path(self.save_dir) / f"{staging}.pth", Path(self.save_dir) / f"{name}.pth")
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not last_filename_basename.startswith(".tmp-"):  # the staging file is never the one to resume from
            write_text_atomic(Path(self.save_dir) / "last_checkpoint", last_filename_basename)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` that refuses partial encoder loads, saves checkpoints atomically and evaluates with the VOC
    evaluator."""

    def build_hooks(self) -> list:
        # DefaultTrainer built a plain DetectionCheckpointer just before; its periodic hook is made here, so swapping
        # it now makes every save (periodic, final, StopHook's) atomic
        plain = self.checkpointer
        self.checkpointer = AtomicCheckpointer(plain.model, plain.save_dir, save_to_disk=plain.save_to_disk,
                                               **plain.checkpointables)
        return super().build_hooks()

    def resume_or_load(self, resume: bool = True) -> None:
        if not (resume and self.checkpointer.has_checkpoint()):
            check_encoder_fits(self.checkpointer.model, self.cfg.MODEL.WEIGHTS)
        super().resume_or_load(resume=resume)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return PascalVOCDetectionEvaluator(dataset_name)


class StoppedEarly(BaseException):
    """Raised from :class:`StopHook` to leave detectron2's loop. A ``BaseException``: ``TrainerBase.train`` logs
    every ``Exception`` with a traceback; this one is a request, not an error."""

    def __init__(self, code: int, iteration: int, checkpoint: str):
        super().__init__(code, iteration, checkpoint)
        self.code, self.iteration, self.checkpoint = code, iteration, checkpoint


class StopHook(HookBase):
    """After each iteration: on SIGINT / SIGTERM or ``--max-time`` (agreed by every process), save a checkpoint that
    ``--resume`` continues from (``model_<iter>.pth``, tagged in ``last_checkpoint`` once written) and leave the loop.

    Args:
        stop: the process's stop request.
        device: where the all-reduce of several processes runs (their ``MODEL.DEVICE``).
    """

    def __init__(self, stop: StopRequest, device: str):
        self.stop, self.device = stop, device

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done >= self.trainer.max_iter:
            return  # the last iteration: the run finishes (and evaluates) as usual
        code = agreed(self.stop, self.device, sync=done % STOP_SYNC_EVERY == 0)
        if not code:
            return
        name = f"model_{self.trainer.iter:07d}"  # detectron2's own name and "iteration" key: resume starts at done
        self.trainer.checkpointer.save(name, iteration=self.trainer.iter)
        comm.synchronize()  # no process leaves (and makes launch stop the others) before the file is written
        raise StoppedEarly(code, done, str(Path(self.trainer.cfg.OUTPUT_DIR) / f"{name}.pth"))


def _trained_weights(cfg: CfgNode, explicit: bool) -> str:
    """What ``--eval-only`` evaluates: ``MODEL.WEIGHTS`` if the user set it, else ``OUTPUT_DIR``'s last checkpoint."""
    if explicit:
        path = Path(cfg.MODEL.WEIGHTS)
    else:
        last = Path(cfg.OUTPUT_DIR) / "last_checkpoint"
        if not last.is_file():
            raise CheckpointError(f"--eval-only: {cfg.OUTPUT_DIR} holds no trained detector (no last_checkpoint); "
                                  "train first, or pass MODEL.WEIGHTS path/to/model_final.pth")
        path = Path(cfg.OUTPUT_DIR) / last.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"--eval-only: detector weights {str(path)!r} do not exist")
    return str(path)


def _flag_opts(args: argparse.Namespace) -> list[str]:
    """The common flags as config overrides; ``KEY VALUE`` pairs after them win."""
    opts = ["SEED", str(args.seed), "OUTPUT_DIR", args.output_dir, "DATALOADER.NUM_WORKERS", str(args.num_workers)]
    if args.mixed_precision == "fp16":
        opts += ["SOLVER.AMP.ENABLED", "True"]
    return opts + list(args.opts)


def prepare(args: argparse.Namespace) -> CfgNode:
    """The config, the converted encoder and the split folders, checked before any process is launched.

    Order: config file, then the encoder's preprocessing and weights, then the flags and ``KEY VALUE`` overrides
    (the user's word is final), then the datasets those name.

    Raises:
        UsageError, CheckpointError, VOCLayoutError: one line for what is missing or does not fit.
    """
    opts = _flag_opts(args)
    cfg = add_timm_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(opts)  # the backbone and OUTPUT_DIR the converter needs may come from the command line
    ckpt = load_encoder(args.model)
    fpn = cfg.MODEL.BACKBONE.NAME == "build_timm_fpn_backbone"
    _, snippet = convert(ckpt, Path(cfg.OUTPUT_DIR) / "encoder_detectron2", fpn=fpn)
    cfg.merge_from_file(str(snippet))
    cfg.merge_from_list(opts)
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise UsageError("--mixed-precision fp16 needs MODEL.DEVICE cuda (detectron2's AMPTrainer is CUDA-only)")
    if args.num_gpus * args.num_machines > 1 and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise UsageError("several processes need MODEL.DEVICE cuda (detectron2's DDP wrapper gives each one a GPU)")
    voc = resolve_voc_dir(args.data_root, args.year)
    train, test = plan_splits(voc, args.year, [split_of(n) for n in cfg.DATASETS.TRAIN],
                              [split_of(n) for n in cfg.DATASETS.TEST], args.holdout, args.seed)
    for spec in (*train, *test):
        write_split_view(voc, spec, Path(cfg.OUTPUT_DIR) / VIEWS)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(s.name for s in train), tuple(s.name for s in test)
    if cfg.MODEL.LOAD_PROPOSALS:
        if not args.proposals_dir:
            raise VOCLayoutError("this config uses precomputed proposals: pass --proposals-dir")
        files = {}
        for spec in (*train, *test):
            files[spec.name] = Path(args.proposals_dir) / f"voc_{args.year}_{spec.source_split}.pkl"
            if not files[spec.name].is_file():
                raise VOCLayoutError(f"proposal file {str(files[spec.name])!r} is missing (convert the "
                                     "selective-search .mat files with python -m transfer.detectron2.proposals)")
        cfg.DATASETS.PROPOSAL_FILES_TRAIN = tuple(str(files[s.name]) for s in train)
        cfg.DATASETS.PROPOSAL_FILES_TEST = tuple(str(files[s.name]) for s in test)
    if args.eval_only:
        cfg.MODEL.WEIGHTS = _trained_weights(cfg, "MODEL.WEIGHTS" in args.opts[::2])
    return cfg


def register_datasets(cfg: CfgNode, year: int) -> None:
    """Register the split folders :func:`prepare` wrote (in every process: the catalogs are per process)."""
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_pascal_voc(name, str(Path(cfg.OUTPUT_DIR) / VIEWS / name), name, year)


def setup(args: argparse.Namespace) -> CfgNode:
    """:func:`prepare` and :func:`register_datasets` in this process; returns the frozen config."""
    cfg = prepare(args)
    register_datasets(cfg, args.year)
    cfg.freeze()
    return cfg


def _worker(cfg: CfgNode, args: argparse.Namespace, started: float) -> dict:
    """One process: train (unless ``--eval-only``), evaluate once, print the metrics on the main process.

    ``started`` is when the command began (``time.monotonic()``, one clock for every process of a machine), from
    which ``--max-time`` counts.
    """
    register_datasets(cfg, args.year)
    cfg.freeze()
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_trained(model, cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
    else:
        with StopRequest(args.max_time, start=started) as stop:
            trainer = Trainer(cfg)
            trainer.register_hooks([StopHook(stop, cfg.MODEL.DEVICE)])
            trainer.resume_or_load(resume=args.resume)
            try:
                trainer.train()
            except StoppedEarly as early:
                return _stopped(early, trainer.max_iter)
        # DefaultTrainer's evaluation hook tests once after the last step and keeps what it found (None on the
        # other processes); testing again here would evaluate the test split twice
        results = getattr(trainer, "_last_eval_results", None) or {}
    if comm.is_main_process():
        for task, metrics in results.items():
            print(task, " ".join(f"{k} {v:.1f}" for k, v in metrics.items()), flush=True)
    return results


def _stopped(early: StoppedEarly, max_iter: int) -> dict:
    """Say where a stopped run stands; exit with the signal's status (``--max-time``: return, status 0)."""
    if comm.is_main_process():
        print(f"python -m transfer.detectron2.train_net: "
              f"{stop_message(early.code, early.iteration, max_iter, early.checkpoint)}", file=sys.stderr, flush=True)
    if early.code == 1:
        return {}
    if comm.get_world_size() > 1:
        sys.exit(early.code)  # a launched worker: launch reports the status to the parent, which exits with it
    raise RunInterrupted("", early.code)


def run(args: argparse.Namespace, cfg: CfgNode | None = None) -> dict:
    """Train and evaluate in this process or through ``launch``; returns detectron2's results
    (``{"bbox": {"AP50": ...}}``) when run in this process, ``{}`` when launched in several.

    Args:
        args: :func:`parse_args`'s flags.
        cfg: :func:`prepare`'s config (default: prepared here).
    """
    started = time.monotonic()
    cfg = prepare(args) if cfg is None else cfg
    if args.num_gpus * args.num_machines == 1:
        return _worker(cfg, args, started)
    from torch.multiprocessing import ProcessExitedException

    try:
        with forward_signals_to_children():
            launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(cfg, args, started))
    except ProcessExitedException as err:
        if err.exit_code in (130, 143):  # the workers saved a checkpoint and said so
            raise RunInterrupted("", err.exit_code) from None
        raise
    return {}


def build_parser() -> argparse.ArgumentParser:
    """The flags: the shared transfer vocabulary (``--model``, ``--output-dir``, ``--num-workers``,
    ``--mixed-precision``, ``--seed``), detectron2's (``--config-file``, ``--eval-only``, ``--resume``, ``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``KEY VALUE`` overrides) and the data's."""
    p = OneLineParser(prog="python -m transfer.detectron2.train_net", description=__doc__.split("\n\n")[0])
    add_common_args(p, output_dir="runs/detectron2", only={"model", "output_dir", "num_workers", "mixed_precision",
                                                             "seed", "overwrite", "max_time"})
    p.add_argument("--config-file", default=str(CONFIG_DIR / "fast_rcnn_alexnet_voc07.yaml"))
    p.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC<year> itself)")
    p.add_argument("--year", type=int, default=2007)
    p.add_argument("--holdout", type=float, default=0.0,
                   help="test on this fraction held out of the training split (for folders without a test list)")
    p.add_argument("--proposals-dir", help="folder of voc_<year>_<split>.pkl proposal files (Fast R-CNN)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate OUTPUT_DIR's last checkpoint (or MODEL.WEIGHTS if given) without training")
    # a flag, not the shared --resume [CHECKPOINT]: an optional value would swallow the first KEY of the overrides
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's last checkpoint")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (detectron2's launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (applied last)")
    return p


def output_dir(args: argparse.Namespace) -> str:
    """The run's ``OUTPUT_DIR``: ``--output-dir``, unless a ``OUTPUT_DIR PATH`` override comes after it."""
    pairs = dict(zip(args.opts[::2], args.opts[1::2]))
    return pairs.get("OUTPUT_DIR", args.output_dir)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Checks of the flags that argparse cannot make.

    Raises:
        UsageError: overrides not in pairs, no process to run, or a precision detectron2's trainer lacks.
    """
    if len(args.opts) % 2:
        raise UsageError(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    check_positive(num_gpus=args.num_gpus, num_machines=args.num_machines)
    if args.eval_only and args.overwrite:
        raise UsageError("--eval-only scores the detector in OUTPUT_DIR; --overwrite would delete it")
    if args.mixed_precision == "bf16":
        raise UsageError("--mixed-precision bf16: detectron2's DefaultTrainer runs AMP in fp16 only")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """:func:`build_parser`'s flags, checked by :func:`check_args`."""
    return check_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Bad input (flags, config keys, data, weights): one line on stderr, exit status 2, before any training."""

    def checked_run(args: argparse.Namespace) -> None:
        check_args(args)
        # before prepare() writes the converted encoder and the split folders into it
        with claim_output_dir(output_dir(args), resume=args.resume or args.eval_only, overwrite=args.overwrite,
                              markers=RUN_MARKERS):
            try:
                cfg = prepare(args)
            except (OSError, ValueError, KeyError, AssertionError) as err:  # yacs: unknown keys by assert/KeyError
                raise UsageError(str(err) or type(err).__name__) from None
            run(args, cfg)

    return run_main(build_parser(), checked_run, argv)


if __name__ == "__main__":
    sys.exit(main())
