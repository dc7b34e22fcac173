"""Atomic, resumable checkpoints: ``accelerator.save_state`` into a temporary folder, renamed into place once
complete."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .config import ConfigError, TrainConfig

__all__ = ["ARCHITECTURE_KEYS", "TrainState", "check_resumable", "checkpoint_dir", "latest_checkpoint",
           "save_checkpoint"]

CHECKPOINT_PREFIX = "step_"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (temporary ones from a killed save are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "run.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class TrainState:
    """Progress that the checkpoint restores besides models, optimisers, scaler and RNGs."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped: set[str] = set()
        self.nonfinite = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": sorted(self.skipped), "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.nonfinite = state["step"], set(state["skipped"]), state["nonfinite"]


def save_checkpoint(accelerator, cfg: TrainConfig, step: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed into place only once complete.

    A run killed at any moment (even ``kill -9`` mid-write) leaves the previous checkpoints intact; the oldest
    are deleted only after the new one is in place.
    """
    root = checkpoint_dir(cfg.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "run.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
                      key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for old in kept[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


ARCHITECTURE_KEYS = ("backbone", "image_size", "pred_size", "overlap", "bottleneck", "batch_size",
                     "gradient_accumulation_steps", "adversarial_weight", "mask", "seed", "data")


def check_resumable(checkpoint: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint of a different run (other architecture, batch, data...)."""
    saved = json.loads((checkpoint / "run.json").read_text())["config"]
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in ARCHITECTURE_KEYS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} belongs to another run ({'; '.join(diff)})")
