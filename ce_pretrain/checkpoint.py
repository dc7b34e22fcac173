"""A run is never lost: atomic resumable checkpoints, an output folder that is never clobbered, clean stops.

* :func:`save_checkpoint` writes ``accelerator.save_state`` into a temporary folder renamed into place once
  complete; our own progress (:class:`TrainState`) goes into its ``run.json`` as JSON, never into a pickle.
* :func:`load_checkpoint` reads a checkpoint without unpickling anything that could run code: it refuses folders
  holding pickles ce-pretrain never writes (accelerate's ``custom_checkpoint_*.pkl``, which accelerate loads with
  ``weights_only=False``) and lets accelerate load the rest, which it does with ``torch.load(weights_only=True)``.
* :func:`prepare_output_dir` refuses an output folder holding another run unless ``--resume`` or ``--overwrite``
  says what to do with it, checks that it is writable, and takes a :class:`RunLock` against concurrent runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from pathlib import Path

from .atomic import complete_dirs, ensure_writable_dir, remove_dir, remove_leftovers, replace_dir, write_text_atomic
from .config import ConfigError, TrainConfig

__all__ = ["ARCHITECTURE_KEYS", "RECIPE_KEYS", "RunLock", "TrainState", "check_resumable", "checkpoint_dir",
           "describe_changes", "latest_checkpoint", "load_checkpoint", "prepare_output_dir", "read_run_json",
           "remove_run_outputs", "save_checkpoint"]

CHECKPOINT_PREFIX = "step_"
LOCK_NAME = ".ce-pretrain.lock"
# what a training run writes into --output-dir; --overwrite deletes exactly these
RUN_OUTPUTS = ("checkpoints", "samples", "logs", "timm-encoder", "model.safetensors", "config.json", "README.md",
               "train_summary.json")
# files accelerate.save_state writes that it reads back with torch.load(weights_only=True) or safetensors
_SAFE_STATE = re.compile(r"^(model(_\d+)?\.safetensors|(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|"
                         r"pytorch_model(_\d+)?\.bin|scaler\.pt|random_states_\d+\.pkl|run\.json)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step(name: str) -> int:
    return int(name[len(CHECKPOINT_PREFIX):])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (temporary ones from a killed save are ignored; see ``atomic.complete_dirs``)."""
    done = complete_dirs(checkpoint_dir(output_dir), CHECKPOINT_PREFIX, "run.json")
    return done[max(done, key=_step)] if done else None


class TrainState:
    """Progress that the checkpoint restores besides models, optimisers, scaler and RNGs (stored as JSON)."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped: set[str] = set()
        self.nonfinite = 0
        # settings changed on resume (--allow-recipe-change): [{"step": N, "changes": {key: [before, after]}}]
        self.recipe_changes: list[dict] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": sorted(self.skipped), "nonfinite": self.nonfinite,
                "recipe_changes": self.recipe_changes}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.nonfinite = int(state["step"]), set(state["skipped"]), int(state["nonfinite"])
        self.recipe_changes = list(state.get("recipe_changes") or [])


def save_checkpoint(accelerator, cfg: TrainConfig, state: TrainState) -> Path:
    """``accelerator.save_state`` and ``run.json`` into a temporary folder, renamed into place only once complete.

    A run killed at any moment (even ``kill -9`` mid-write or mid-delete) leaves the previous checkpoints intact;
    the oldest are deleted only after the new one is in place, and a checkpoint of the same step (the final save
    of a run resumed at its last step) is swapped, never deleted first (``atomic.replace_dir``).
    """
    root = checkpoint_dir(cfg.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        remove_leftovers(root)  # of a killed save (the run's lock makes this process the folder's only writer)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run = {"step": state.step, "state": state.state_dict(), "config": dataclasses.asdict(cfg)}
        write_text_atomic(tmp / "run.json", json.dumps(run, indent=2))
        replace_dir(tmp, final)
        kept = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=lambda p: _step(p.name))
        for old in kept[: -cfg.keep_checkpoints]:
            remove_dir(old)
    accelerator.wait_for_everyone()
    return final


def read_run_json(checkpoint: Path) -> dict:
    """A checkpoint's ``run.json``, or one line saying why it cannot be used."""
    path = Path(checkpoint) / "run.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(checkpoint)!r} is not a checkpoint folder (no run.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} is corrupt ({str(e).splitlines()[0]}); resume from an older checkpoint "
                          f"in {str(Path(checkpoint).parent)!r}") from None
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict) or not isinstance(run.get("step"), int):
        raise ConfigError(f"{str(path)!r} is not a ce-pretrain run.json (no step or config)")
    return run


def _check_no_foreign_pickles(checkpoint: Path) -> None:
    foreign = sorted(p.name for p in Path(checkpoint).iterdir() if p.is_file() and not _SAFE_STATE.match(p.name))
    pickles = [n for n in foreign if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))]
    if pickles:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} holds {', '.join(pickles)}, which ce-pretrain never "
                          "writes; refusing to unpickle it (a pickle can run any code)")


def load_checkpoint(accelerator, checkpoint: Path, state: TrainState) -> None:
    """Restore models, optimisers, scaler, RNGs and ``state`` without unpickling anything that can run code.

    Raises:
        ConfigError: a corrupt ``run.json``, a foreign pickle, or state files that cannot be read (named).
    """
    run = read_run_json(checkpoint)
    _check_no_foreign_pickles(checkpoint)
    _check_random_states(checkpoint)
    # accelerate would name the pickle fallback it looks for next (pytorch_model.bin), a file ce-pretrain never writes
    missing = [name for name in ("model.safetensors", "optimizer.bin") if not (Path(checkpoint) / name).is_file()]
    if missing:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is incomplete ({', '.join(missing)} missing); resume "
                          "from an older one by passing its folder to --resume")
    try:
        # every torch.load in accelerate's load_state defaults to weights_only=True; custom objects (the only
        # weights_only=False path) are never registered, and their files were refused above
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # safetensors, torch and accelerate raise assorted types for damaged files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot resume from {str(checkpoint)!r}: {reason} (a damaged checkpoint? resume from an "
                          "older one by passing its folder to --resume)") from None
    state.load_state_dict(run.get("state") or {"step": run["step"], "skipped": [], "nonfinite": 0})


def _check_random_states(checkpoint: Path) -> None:
    """accelerate restores the random states last and only logs (at INFO) when their file cannot be read, so a
    damaged one would silently break exact resumption; read each here first, as accelerate does (weights only)."""
    from accelerate.utils import load

    for path in sorted(checkpoint.glob("random_states_*.pkl")):
        try:
            states = load(path)
            if not isinstance(states, dict) or "random_state" not in states:
                raise ValueError("not a random-state file")
        except Exception as e:  # torch raises assorted types for damaged files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot resume from {str(checkpoint)!r}: {path.name} is damaged ({reason}); resume "
                              "from an older checkpoint by passing its folder to --resume") from None


ARCHITECTURE_KEYS = ("backbone", "image_size", "pred_size", "overlap", "bottleneck", "batch_size",
                     "gradient_accumulation_steps", "adversarial_weight", "mask", "seed", "data", "decoder_norm")
# what each step learns from, besides the architecture: a resume may change these only when asked to
# (--allow-recipe-change), and the change is recorded. --max-steps, --schedule-steps, logging, checkpointing,
# workers, precision and the stopping flags may change freely.
RECIPE_KEYS = ("data_split", "streaming", "mask_shapes", "mask_source", "loss", "high_pass_weight", "augment",
               "fc_dropout", "lr", "beta1", "weight_decay", "discriminator_lr", "lr_schedule", "warmup_steps")


def check_resumable(checkpoint: Path, cfg: TrainConfig) -> dict[str, list]:
    """Refuse to resume a checkpoint of a different run (other architecture, batch, data...), one trained with
    another recipe (loss, lr, augmentation...) unless ``cfg.allow_recipe_change``, or one holding pickles
    ce-pretrain never writes.

    Returns:
        the recipe settings this resume changes, ``{key: [checkpoint's, now]}`` (empty when none).
    """
    # a key missing from an older checkpoint's run.json had its default then
    saved = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | read_run_json(checkpoint)["config"]
    _check_no_foreign_pickles(checkpoint)
    _check_random_states(checkpoint)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in ARCHITECTURE_KEYS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} belongs to another run ({'; '.join(diff)})")
    changes = {k: [saved.get(k), getattr(cfg, k)] for k in RECIPE_KEYS if saved.get(k) != getattr(cfg, k)}
    if changes and not cfg.allow_recipe_change:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} was trained with other settings "
                          f"({describe_changes(changes)}): resume with the same flags, or add "
                          "--allow-recipe-change to go on with the new ones (recorded in the run's summary)")
    return changes


def describe_changes(changes: dict[str, list]) -> str:
    """``{"lr": [1e-4, 1e-5]}`` → ``"--lr 0.0001 → 1e-05"``."""
    return "; ".join(f"--{k.replace('_', '-')} {before!r} → {after!r}" for k, (before, after) in changes.items())


# ------------------------------------------------------------------------------------------- the output folder
class RunLock:
    """``<output-dir>/.ce-pretrain.lock``: one run at a time per folder; a lock whose process died is taken over.

    The file holds the owner's pid and host; it is created with ``O_EXCL``, so of two runs started together
    exactly one gets it.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._alive(owner):
                    raise ConfigError(
                        f"another run (pid {owner['pid']} on {owner['host']}) is writing to "
                        f"{str(self.path.parent)!r}; wait for it, or pick another --output-dir (if that process is "
                        f"gone, delete {str(self.path)!r})") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise ConfigError(f"cannot take the lock {str(self.path)!r}: another run keeps taking it")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None  # half-written or garbage: treated as stale

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked from here
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        return True

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and write a probe file into it; one line if that fails (read-only, a file...)."""
    try:
        ensure_writable_dir(folder)
    except OSError as e:
        raise ConfigError(f"{flag} {str(folder)!r} is not writable: {e.strerror or type(e).__name__}") from None


def prepare_output_dir(cfg: TrainConfig) -> RunLock:
    """Check ``cfg.output_dir`` before any work and lock it; returns the lock (call it on the main process only).

    A folder holding files is refused unless ``cfg.resume`` continues its run or ``cfg.overwrite`` replaces it
    (deleting the earlier run's outputs, its checkpoints first, so a later ``--resume`` cannot pick up the old run).

    Raises:
        ConfigError: a non-empty folder without --resume / --overwrite, an unwritable folder, or a locked one.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {str(out)!r} exists and is not a folder")
    existing = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if existing and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ConfigError(f"--output-dir {str(out)!r} is not empty ({shown}); pass --resume to continue the run in "
                          "it, --overwrite to replace it, or choose another --output-dir")
    check_writable(out, "--output-dir")
    lock = RunLock(out).acquire()
    if cfg.overwrite:
        remove_run_outputs(out, RUN_OUTPUTS)
    return lock


def remove_run_outputs(folder: Path, patterns: tuple[str, ...] | list[str]) -> None:
    """Delete what an earlier run wrote into ``folder`` (``--overwrite``): the files and folders matching
    ``patterns`` (names or globs such as ``model_*.pth``), nothing else — the user's other files stay."""
    for target in [t for pattern in patterns for t in folder.glob(pattern)]:
        if target.is_dir() and not target.is_symlink():
            remove_dir(target)
        else:
            target.unlink(missing_ok=True)
