"""The flag vocabulary and exit codes every transfer entry point shares.

    parser = argparse.ArgumentParser(prog="python -m transfer.classification.train", description=...)
    add_common_args(parser, output_dir="runs/voc07-cls")
    parser.add_argument("--data-root", required=True)

    def run(args: argparse.Namespace) -> int | None:
        out = check_output_dir(args.output_dir, resume=args.resume is not None, overwrite=args.overwrite)
        ...  # raise UsageError("...") for bad input found later

    def main(argv=None) -> int:
        return run_main(parser, run, argv)

    if __name__ == "__main__":
        sys.exit(main())

Flags (:func:`add_common_args`; the same names as ``ce_pretrain/train.py``): ``--model``, ``--output-dir``,
``--overwrite``, ``--num-workers``, ``--mixed-precision no|fp16|bf16``, ``--seed``, ``--resume [CHECKPOINT]``,
``--max-time 20m|1h30m|SECONDS``, ``--log-with csv,tensorboard|none``.

Exit codes (:func:`run_main`): 0 done; 2 bad input, reported as one line ``prog: error: ...`` before any work
where it can be found up front; 130 / 143 stopped by SIGINT / SIGTERM after saving a resumable checkpoint and the
results as they stand, with a line saying how to resume. ``--max-time`` ends the same way with status 0: the
budget was asked for (``results.json`` then says ``"complete": false``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ce_pretrain.atomic import ensure_writable_dir
from ce_pretrain.config import OneLineParser, check_trackers

__all__ = [
    "EXIT_USAGE",
    "OneLineParser",
    "RunFlags",
    "RunInterrupted",
    "UsageError",
    "add_common_args",
    "add_training_args",
    "add_voc_args",
    "check_output_dir",
    "check_positive",
    "claim_output_dir",
    "declared_defaults",
    "parse_duration",
    "run_main",
    "stop_message",
]

EXIT_USAGE = 2
COMMON_FLAGS = ("model", "output_dir", "overwrite", "num_workers", "mixed_precision", "seed", "resume", "max_time",
                "log_with")
_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?")


class UsageError(ValueError):
    """Bad input from the command line: one line on stderr, exit status 2."""


class RunInterrupted(Exception):
    """A run stopped early by a signal after saving a resumable checkpoint; :func:`run_main` exits ``exit_code``.

    Args:
        message: what was saved and how to resume, printed as is.
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"20m"``, ``"1h30m"``, ``"1.5h"``.

    Raises:
        ValueError: ``text`` is none of these, or not positive.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groupdict().values()):
        raise ValueError(f"cannot read {text!r} as a duration: use seconds, or e.g. 20m, 1h30m, 45s")
    h, m, s = (float(match[k] or 0) for k in "hms")
    seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _trackers_arg(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    names = [] if names == ["none"] else names
    try:
        check_trackers(names)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return names


def add_common_args(parser: argparse.ArgumentParser, *, output_dir: str | None = None, num_workers: int = 2,
                    only: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """Add the shared flags to ``parser`` (in an argument group "common").

    Args:
        parser: the entry point's parser.
        output_dir: default ``--output-dir``; None makes the flag required.
        num_workers: default ``--num-workers``.
        only: add just these flags (destination names, e.g. ``{"model", "output_dir"}``); default: all of
            ``COMMON_FLAGS``.

    Returns:
        ``parser``, for chaining.
    """
    keep = set(COMMON_FLAGS if only is None else only)
    unknown = keep - set(COMMON_FLAGS)
    if unknown:
        raise ValueError(f"unknown common flags {sorted(unknown)}; known: {list(COMMON_FLAGS)}")
    g = parser.add_argument_group("common")
    if "model" in keep:
        g.add_argument("--model", required=True, metavar="SRC",
                       help="ContextEncoder folder, timm encoder folder, Hub id (owner/name) or random:<timm name>")
    if "output_dir" in keep:
        g.add_argument("--output-dir", required=output_dir is None, default=output_dir,
                       help="results.json, checkpoints and logs go here"
                            + (f" (default: {output_dir})" if output_dir else ""))
    if "overwrite" in keep:
        g.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --output-dir that holds an earlier run (its files are replaced)")
    if "num_workers" in keep:
        g.add_argument("--num-workers", type=int, default=num_workers, help="data-loading processes")
    if "mixed_precision" in keep:
        g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                       help="autocast precision; default: accelerate's config (or 'no')")
    if "seed" in keep:
        g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    if "resume" in keep:
        g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="continue from the latest checkpoint in --output-dir, or from the given checkpoint")
    if "max_time" in keep:
        g.add_argument("--max-time", type=_duration_arg, metavar="DURATION",
                       help="stop cleanly after this long (e.g. 20m, 1h30m, or seconds), saving a resumable "
                            "checkpoint and the results so far")
    if "log_with" in keep:
        g.add_argument("--log-with", type=_trackers_arg, default=["csv"], metavar="TRACKERS",
                       help="comma-separated trackers: csv (built in), tensorboard, wandb, ... (any accelerate "
                            "tracker), or none")
    return parser


def declared_defaults(config: object) -> dict:
    """The defaults a config dataclass declares, by field (``{}`` for anything else): what a run saved before a
    flag existed did, so that its checkpoint or stage file still matches a run with that flag at its default."""
    try:
        return {f.name: f.default for f in fields(config) if f.default is not MISSING}
    except TypeError:  # not a dataclass
        return {}


@dataclass(kw_only=True)
class RunFlags:
    """How a transfer run executes: the fields of :func:`add_common_args` and ``--checkpoint-every`` that every
    task's config shares (a task adds ``model``, ``output_dir`` and its own fields)."""

    num_workers: int = 2
    seed: int = 0
    mixed_precision: str | None = None
    resume: str | None = None
    overwrite: bool = False
    max_time: float | None = None
    log_with: list[str] = field(default_factory=lambda: ["csv"])
    checkpoint_every: int = 1000


def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float,
                      weight_decay: float = 1e-4) -> argparse.ArgumentParser:
    """Add ``--epochs``, ``--max-steps``, ``--batch-size``, ``--lr``, ``--weight-decay`` and ``--checkpoint-every``
    with the task's defaults."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per process per step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=weight_decay)
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between resumable checkpoints")
    return parser


def add_voc_args(parser: argparse.ArgumentParser, *, year: int, train_split: str,
                 test_split: str) -> argparse.ArgumentParser:
    """Add ``--data-root``, ``--year``, ``--train-split``, ``--test-split`` and ``--holdout`` (PASCAL VOC data)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-root", required=True, help="VOCdevkit folder (or VOC<year> itself)")
    g.add_argument("--year", type=int, default=year)
    g.add_argument("--train-split", default=train_split)
    g.add_argument("--test-split", default=test_split)
    g.add_argument("--holdout", type=float, default=0.0,
                   help="test on this fraction held out of --train-split instead of --test-split")
    return parser


def check_positive(**values: float | None) -> None:
    """Raise :class:`UsageError` naming the first flag whose value is given and below 1.

    Example: ``check_positive(max_steps=cfg.max_steps, batch_size=cfg.batch_size)``.
    """
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_output_dir(path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                     markers: Sequence[str] = ("results.json", "checkpoints")) -> Path:
    """Create ``path`` and prove it writable before any work; refuse to run over an earlier run by accident.

    Args:
        path: the ``--output-dir``.
        resume: ``--resume`` was given (an earlier run there is expected).
        overwrite: ``--overwrite`` was given (an earlier run there may be replaced).
        markers: names (or glob patterns, e.g. ``model_*.pth``) whose presence shows an earlier run.

    Raises:
        UsageError: not a folder, not writable, or holding an earlier run without ``resume``/``overwrite``.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {str(out)!r} exists and is not a folder")
    try:
        ensure_writable_dir(out)
    except OSError as err:
        raise UsageError(f"--output-dir {str(out)!r} is not writable: {err.strerror or err}") from None
    earlier = [m for m in markers if any(out.glob(m))]
    if earlier and not (resume or overwrite):
        raise UsageError(f"--output-dir {str(out)!r} holds an earlier run ({', '.join(earlier)}); pass --resume to "
                         "continue it or --overwrite to start afresh")
    return out


@contextlib.contextmanager
def claim_output_dir(path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                     markers: Sequence[str] = ("results.json", "checkpoints")) -> Iterator[Path]:
    """:func:`check_output_dir`, then, on the main process (``RANK`` 0), hold the folder's lock for the run and,
    with ``overwrite``, delete the earlier run's ``markers`` (so that a later ``--resume`` cannot pick up its
    checkpoints). The lock is ce-pretrain's :class:`~ce_pretrain.checkpoint.RunLock`: one run per folder, a lock
    whose process died is taken over.

    Raises:
        UsageError: as :func:`check_output_dir`, or another live run holds the folder.
    """
    from ce_pretrain.checkpoint import RunLock, remove_run_outputs
    from ce_pretrain.config import ConfigError

    out = check_output_dir(path, resume=resume, overwrite=overwrite, markers=markers)
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of a launch share the main one's claim
        yield out
        return
    try:
        lock = RunLock(out).acquire()
    except ConfigError as err:
        raise UsageError(str(err)) from None
    with lock:
        if overwrite and not resume:
            remove_run_outputs(out, markers)
        yield out


def stop_message(code: int, done: int, total: int, checkpoint: str | os.PathLike) -> str:
    """What a stopped library-trainer run (detectron2, mmseg) reports: why, where, and how to continue."""
    from ce_pretrain.stopping import describe

    return (f"stopped by {describe(code)} after iteration {done}/{total}: checkpoint {checkpoint}; to continue, "
            "rerun the same command with --resume")


def _first_line(error: BaseException) -> str:
    """The line that says what went wrong; for an error re-raised from a DataLoader worker ("Caught X in DataLoader
    worker process 0", then the worker's traceback) that is the traceback's last line, without the type name."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        kind, _, message = lines[-1].partition(": ")
        return message if message and kind.rsplit(".", 1)[-1] == type(error).__name__ else lines[-1]
    return lines[0]


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv``, call ``run(args)`` and turn the ways it can end into exit codes (module docstring).

    Args:
        parser: the entry point's parser (its ``prog`` starts each error line).
        run: does the work; returns an exit code, or anything else (None, results) for 0.
        argv: arguments (default ``sys.argv[1:]``).
        errors: more exception types that mean bad input (exit 2); :class:`UsageError`,
            ``transfer.common.CheckpointError`` and ``VOCLayoutError`` always do.

    Returns:
        The exit status, for ``sys.exit``.
    """
    from .checkpoint import CheckpointError
    from .voc import VOCLayoutError

    args = parser.parse_args(argv)  # argparse itself exits 2 on unknown or malformed flags
    try:
        status = run(args)
        return status if isinstance(status, int) else 0
    except (UsageError, CheckpointError, VOCLayoutError, *errors) as err:
        print(f"{parser.prog}: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except RunInterrupted as stop:
        if str(stop):
            print(f"{parser.prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # before or after the training loop, which handles SIGINT itself
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
