"""One fine-tuning engine, on accelerate, for every transfer task we own (classification fine-tune and linear
probe, torchvision Faster R-CNN, torchvision FCN, ImageFolder classification).

A task is a model, an optimizer, a training set, a loss of one batch and an evaluation; :func:`fit` does the rest:
device placement, ``--mixed-precision``, several processes under ``accelerate launch`` (DDP over gloo on CPUs
when no GPU is present), a progress bar with loss and rate, metrics to csv / tensorboard (``logs/<task>/``),
atomic resumable checkpoints (``checkpoints/``, nothing unpickled on resume), SIGINT / SIGTERM and
``--max-time`` ending the run with a checkpoint and the results so far, and ``results.json``::

    from accelerate.utils import set_seed
    from transfer.common.engine import EngineConfig, Task, fit

    set_seed(cfg.seed)                       # before building anything random: model heads, data order
    model = ckpt.create_model(num_classes=20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def loss(model, batch):                  # batch already on the device, forward under autocast
        images, targets = batch
        return masked_bce(model(images), targets)        # or (loss, {"accuracy": tensor, ...})

    def evaluate(model, device):             # after training, main process, under autocast
        return {"mAP": ...}

    task = Task(name="voc07-cls", model=model, optimizer=optimizer, train_set=train_set, batch_size=32,
                loss=loss, evaluate=evaluate, epochs=30,
                scheduler=lambda opt, total: OneCycleLR(opt, 3e-4, total_steps=total), config=asdict(cfg))
    results = fit(task, EngineConfig(output_dir="runs/cls", mixed_precision="bf16", max_time=3600))

On CPU with ``num_workers=0`` a run interrupted and resumed gives bit-identical results to an uninterrupted one,
and the same numbers as the hand-written loops the engine replaced (the data order is ``DataLoader(shuffle=True)``'s
under the same seed). With data-loading workers, the order is still exact but the augmentations drawn after a
resume differ, because the workers restart their own generators.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ce_pretrain.atomic import remove_dir, replace_dir, write_text_atomic
from ce_pretrain.stopping import StopRequest, agreed, describe

from .cli import RunInterrupted, UsageError, check_positive, claim_output_dir, declared_defaults
from .sampler import ResumableRandomSampler
from .snapshot import CHECKPOINTS, latest_checkpoint, load_snapshot, restore_generators, save_snapshot

__all__ = ["EngineConfig", "Task", "TrainingDiverged", "fit"]

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
# flags that change how a run executes but not what it computes: free to differ when resuming
_RUN_KEYS = {"output_dir", "resume", "overwrite", "max_time", "num_workers", "log_with", "mixed_precision",
             "save_model"}
MODEL_DIR = "model"  # where a task's ``save`` puts the trained model
_RECENT = 10  # final_loss: mean of the last 10 step losses


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class Task:
    """What one transfer task brings to :func:`fit`.

    Attributes:
        name: short name, for logs and trackers (``logs/<name>/metrics.csv``).
        model: the model, with weights loaded, on the CPU.
        optimizer: over the parameters to train.
        train_set: training items; batches of ``collate_fn`` reach ``loss`` on the device.
        batch_size: items per process per step.
        loss: ``(model, batch) → loss`` or ``(loss, {name: scalar tensor})`` for one batch.
        evaluate: ``(model, device) → metrics`` on the unwrapped model after training.
        epochs: passes over ``train_set`` when ``max_steps`` is None.
        max_steps: optimizer steps (overrides ``epochs``).
        scheduler: ``(optimizer, total_steps) → LRScheduler`` stepped once per optimizer step.
        collate_fn: ``DataLoader`` collate function.
        drop_last: drop the last incomplete batch of each epoch.
        clip_grad_norm: clip the gradient norm to this before each step.
        config: the task's flags (its config dataclass, or a JSON-typed dict), saved in ``results.json`` and
            checked on resume; a dataclass's defaults stand for settings a checkpoint predates.
        info: more entries for ``results.json`` (e.g. the backbone, the number of test images).
        save: ``(model, folder) → None`` writes the trained (unwrapped) model into ``folder``, which the engine then
            puts in place as ``output_dir/model/`` in one rename, before ``results.json``; None: no model is kept.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_set: torch.utils.data.Dataset
    batch_size: int
    loss: Callable[[nn.Module, Any], LossOutput]
    evaluate: Callable[[nn.Module, torch.device], dict]
    epochs: int = 1
    max_steps: int | None = None
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    collate_fn: Callable | None = None
    drop_last: bool = False
    clip_grad_norm: float | None = None
    config: Any = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    save: Callable[[nn.Module, Path], None] | None = None


@dataclass
class EngineConfig:
    """How :func:`fit` runs a task (the common flags of :mod:`transfer.common.cli`).

    Attributes:
        output_dir: ``results.json``, ``checkpoints/`` and ``logs/`` go here.
        mixed_precision: ``no``, ``fp16`` or ``bf16``; None: accelerate's config.
        seed: data order with several processes (one process: the global generator, seeded by the caller).
        resume: ``"latest"`` or a checkpoint folder.
        overwrite: start afresh over an earlier run in ``output_dir``.
        max_time: seconds of training after which the run stops as if interrupted (exit status 0).
        log_with: trackers (``csv``, ``tensorboard``, ...).
        log_every: steps between logged (and progress-bar) losses, the only host syncs of the loop.
        checkpoint_every: steps between resumable checkpoints (0: only when stopped early).
        num_workers: data-loading processes.
        cpu: run on the CPU even if a GPU is present.
        progress: show a progress bar.
    """

    output_dir: str | os.PathLike
    mixed_precision: str | None = None
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    max_time: float | None = None
    log_with: Sequence[str] = ("csv",)
    log_every: int = 10
    checkpoint_every: int = 1000
    num_workers: int = 0
    cpu: bool = False
    progress: bool = True

    @classmethod
    def from_flags(cls, flags: Any, **overrides) -> EngineConfig:
        """The fields of ``flags`` (a config dataclass or ``argparse.Namespace``) that share a name with ours."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in vars(flags).items() if k in names}, **overrides})


def _accelerator(cfg: EngineConfig, out: Path, task_name: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    from ce_pretrain.host_memory import retain_freed_memory
    from ce_pretrain.tracking import CSVTracker

    # the precision is process-wide state in accelerate; a new run in the same process may ask for another one
    AcceleratorState._reset_state()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun-style launch: without GPUs, DDP on gloo
    trackers = [CSVTracker(task_name, out / "logs") if n == "csv" else n for n in cfg.log_with]
    try:
        accelerator = Accelerator(
            cpu=cfg.cpu or (distributed and not torch.cuda.is_available()), mixed_precision=cfg.mixed_precision,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    except (ValueError, ImportError) as err:  # e.g. bf16 on a GPU without it, tensorboard not installed
        raise UsageError(str(err).splitlines()[0]) from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate would run fp32
        raise UsageError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # a CPU step otherwise page-faults its large tensors in anew every step
    return accelerator


def _json_config(config: Any) -> tuple[dict, dict]:
    """``(config, defaults)`` as JSON values: a dataclass's fields and the defaults it declares (none for a dict)."""
    defaults = declared_defaults(config)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return tuple(json.loads(json.dumps(c, default=str)) for c in (config, defaults))


def _check_same_run(saved: dict, config: dict, what: str, defaults: dict | None = None) -> None:
    """Refuse a checkpoint or finished run of other settings; a setting it predates reads as its default."""
    defaults = defaults or {}
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in _RUN_KEYS and saved.get(k, defaults.get(k)) != config.get(k))
    if differ:
        k = differ[0]
        raise UsageError(f"{what} is of another run: --{k.replace('_', '-')} was "
                         f"{saved.get(k, defaults.get(k))!r}, now {config.get(k)!r} ({len(differ)} setting(s) differ)")


def _finished_run(out: Path, config: dict, defaults: dict) -> dict | None:
    """The results of a finished run of this config in ``out`` (``--resume`` then has nothing to do), or None."""
    results = out / "results.json"
    if latest_checkpoint(out) is not None or not results.is_file():
        return None
    try:
        previous = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not (previous.get("complete") and isinstance(previous.get("config"), dict)):
        return None
    _check_same_run(previous["config"], config, f"the finished run {str(results)!r}", defaults)
    print(f"{results} holds the finished run; nothing to resume", file=sys.stderr)
    return previous


def fit(task: Task, cfg: EngineConfig) -> dict:
    """Train ``task`` (or resume it), evaluate it and write ``results.json`` (see the module docstring).

    Returns:
        ``{"config", **metrics, "steps", "final_loss", "complete", ...}``; ``complete`` is False when
        ``--max-time`` stopped the run (no evaluation then).

    Raises:
        UsageError: bad settings, found before training.
        RunInterrupted: SIGINT / SIGTERM stopped the run, after the checkpoint and results were saved.
        TrainingDiverged: the loss became non-finite.
    """
    check_positive(batch_size=task.batch_size, max_steps=task.max_steps, epochs=task.epochs,
                   log_every=cfg.log_every)
    with claim_output_dir(cfg.output_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite,
                          markers=("results.json", CHECKPOINTS, MODEL_DIR)) as out:
        return _fit(task, cfg, out)


def _fit(task: Task, cfg: EngineConfig, out: Path) -> dict:
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm

    config, defaults = _json_config(task.config)
    finished = _finished_run(out, config, defaults) if cfg.resume == "latest" else None
    if finished is not None:
        return finished
    accelerator = _accelerator(cfg, out, task.name)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index

    sampler = ResumableRandomSampler(len(task.train_set), cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        task.train_set, batch_size=task.batch_size, sampler=sampler, drop_last=task.drop_last,
        collate_fn=task.collate_fn, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UsageError(f"{len(task.train_set)} training items make no batch of {task.batch_size} per process")
    total = task.max_steps or task.epochs * len(loader)
    scheduler = task.scheduler(task.optimizer, total) if task.scheduler else None
    model, optimizer = accelerator.prepare(task.model, task.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    step, epoch, consumed, logged_steps, generators = 0, 0, 0, 0, None
    recent = torch.zeros(_RECENT, device=device)
    sums: dict[str, torch.Tensor] = {}
    checkpoint = None
    if cfg.resume:
        checkpoint = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume).expanduser()
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {out / CHECKPOINTS}; starting from scratch")
    if checkpoint is not None:
        state, tensors = load_snapshot(accelerator, checkpoint, accelerator.unwrap_model(model), optimizer)
        _check_same_run(state["config"], config, f"checkpoint {str(checkpoint)!r}", defaults)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, consumed, logged_steps = state["step"], state["epoch"], state["consumed"], state["logged_steps"]
        sampler.resume(epoch, state["epoch_seed"], consumed * task.batch_size)
        recent = tensors.pop("recent").to(device)
        sums = {k[len("sum."):]: v.to(device) for k, v in tensors.items() if k.startswith("sum.")}
        generators = tensors
        accelerator.print(f"resumed from {checkpoint} at step {step}/{total}")

    if accelerator.is_main_process:
        accelerator.init_trackers(task.name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in config.items()})
    started, stop_code = time.monotonic(), 0
    last_log = [started]  # when the last logged interval ended, for the image rate
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_local_main_process), desc=task.name)

    def snapshot() -> Path:
        finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
        if not bool(finite.item()):  # never save a broken model over the last good checkpoint
            raise TrainingDiverged(f"{task.name}: the weights became NaN or infinite by step {step}; lower the "
                                   "learning rate" + (" (the last checkpoint is still finite)"
                                                      if latest_checkpoint(out) else ""))
        state = {"config": config, "epoch": epoch, "consumed": consumed, "epoch_seed": sampler.epoch_seed,
                 "logged_steps": logged_steps,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        tensors = {"recent": recent, **{f"sum.{k}": v for k, v in sums.items()}}
        return save_snapshot(accelerator, out, step, accelerator.unwrap_model(model), optimizer, state, tensors)

    def log() -> None:
        nonlocal logged_steps
        names = sorted(sums)
        stacked = torch.stack([sums[k] for k in names])
        if world > 1:  # the mean over processes, as one batch of world × batch_size would give
            stacked = accelerator.reduce(stacked, "mean")
        totals = stacked.tolist()  # the loop's one host sync
        values = {k: t / max(1, step - logged_steps) for k, t in zip(names, totals)}
        now = time.monotonic()
        values["images_per_s"] = (step - logged_steps) * task.batch_size * world / max(now - last_log[0], 1e-9)
        last_log[0] = now
        if not math.isfinite(values.get("loss", 0.0)):
            raise TrainingDiverged(f"{task.name}: the training loss became {values['loss']} by step {step}; "
                                   "lower the learning rate")
        values["lr"] = optimizer.param_groups[0]["lr"]
        accelerator.log(values, step=step)
        bar.set_postfix(loss=f"{values['loss']:.4g}", img_s=f"{values['images_per_s']:.1f}", refresh=False)
        sums.clear()
        logged_steps = step

    with StopRequest(cfg.max_time, start=started) as stop:
        model.train()
        while step < total and not stop_code:
            batches = iter(loader)  # draws the workers' seed from the global generator, as DataLoader does
            if generators is not None:  # the state the snapshot took, after this same draw
                restore_generators(generators)
                generators = None
            for batch in batches:
                batch = send_to_device(batch, device, non_blocking=True)
                with accelerator.autocast():
                    output = task.loss(model, batch)
                loss, extra = output if isinstance(output, tuple) else (output, {})
                accelerator.backward(loss)
                if task.clip_grad_norm:
                    accelerator.clip_grad_norm_(params, task.clip_grad_norm)
                optimizer.step()
                if scheduler is not None and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, consumed = step + 1, consumed + 1
                detached = loss.detach().float()
                recent[(step - 1) % _RECENT] = detached
                for k, v in {"loss": detached, **extra}.items():
                    sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float().clone()
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    log()
                stop_code = 0 if step >= total else agreed(stop, device, sync=step % cfg.log_every == 0)
                if step >= total or stop_code:
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    snapshot()
            else:
                epoch, consumed = epoch + 1, 0
                sampler.epoch = epoch
        bar.close()
        final = recent[:min(step, _RECENT)].double().mean() if step else torch.tensor(float("nan"), device=device)
        final_loss = (accelerator.reduce(final, "mean") if world > 1 else final).item()
        results = {"config": config, "task": task.name, **task.info, "steps": step, "total_steps": total,
                   "final_loss": final_loss, "complete": not stop_code,
                   "mixed_precision": accelerator.mixed_precision, "num_processes": world, "device": str(device),
                   "train_seconds": round(time.monotonic() - started, 3)}
        if stop_code:
            saved = snapshot()
            if accelerator.is_main_process:
                write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
            accelerator.end_training()
            reason = "stopped at --max-time" if stop_code == 1 else f"stopped by {describe(stop_code)}"
            message = (f"{reason} at step {step}/{total}: checkpoint {saved}, results so far in "
                       f"{out / 'results.json'}; to continue, rerun the same command with --resume")
            if stop_code > 1:  # every process exits with the signal's status; the main one says why
                raise RunInterrupted(message if accelerator.is_main_process else "", stop_code)
            accelerator.print(message)
            return results
    if accelerator.is_main_process:
        with accelerator.autocast():
            results.update(task.evaluate(accelerator.unwrap_model(model), device))
        if task.save is not None:
            staging = out / f".tmp-{MODEL_DIR}"
            remove_dir(staging)
            staging.mkdir()
            task.save(accelerator.unwrap_model(model), staging)
            replace_dir(staging, out / MODEL_DIR)
            results["model_dir"] = str(out / MODEL_DIR)
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        remove_dir(out / CHECKPOINTS)  # resumable state of a run that is now finished (hidden first: kill-safe)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
