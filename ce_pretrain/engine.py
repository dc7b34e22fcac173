"""The pretraining loop under accelerate, one function per phase (as MAE's ``engine_pretrain.py``).

:func:`run` = :func:`make_accelerator` → :class:`~ce_pretrain.objective.ContextEncoderObjective` →
:func:`resume` → :func:`make_loader` → :func:`train_loop` → :func:`finish`. Outputs in ``cfg.output_dir``:
``config.json`` + ``model.safetensors`` + ``README.md`` (``ContextEncoder.from_pretrained``), ``timm-encoder/``,
``checkpoints/step_*``, ``samples/*.png``, ``logs/`` and ``train_summary.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import AutocastKwargs, ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .checkpoint import (
    RunLock,
    TrainState,
    check_resumable,
    checkpoint_dir,
    describe_changes,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .cuda_graph import GraphedStep, check_supported, plain_rates
from .data import EpochSampler, ImageDataset, StreamingImageDataset, collate
from .export import save_timm_encoder
from .figure import save_sample_grid
from .gpu_data import CachedCrops, open_cache
from .host_memory import retain_freed_memory
from .masks import ShapeBank
from .objective import ContextEncoderObjective, NonFiniteMonitor, all_finite, step_seed
from .schedule import lr_factor
from .stopping import StopRequest, agreed, describe, exit_status
from .tracking import make_trackers, tracker_config

__all__ = ["RESCALE_IMAGES", "STOP_SYNC_EVERY", "check_nonfinite", "checkpoint_to_resume", "claim_output_dir",
           "ensure_finite_weights", "finish", "fixed_images", "make_accelerator", "make_loader", "resume", "run",
           "should_stop", "train_loop"]

# steps between the all-reduces by which several processes agree to stop (a signal, --max-time): a 4-byte
# collective that waits for the device, so not every step; one process decides alone, every step, for free
STOP_SYNC_EVERY = 10
# training crops on which --encoder-init rescale calibrates the encoder (as the transfer's --rescale-images)
RESCALE_IMAGES = 64


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's ``Accelerator``; torchrun-style launches (``accelerate launch --multi_gpu``) on a machine without
    GPUs run DDP over gloo on CPUs."""
    out = Path(cfg.output_dir)
    torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels once
    accelerator = Accelerator(
        cpu=_use_cpu(cfg),
        mixed_precision=cfg.mixed_precision,
        # a captured step must not reuse weight casts cached while capturing
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if cfg.cuda_graph else None,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=make_trackers(cfg.log_with, out / "logs") or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # a CPU step otherwise page-faults its large tensors in anew every step
    return accelerator


def _use_cpu(cfg: TrainConfig) -> bool:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return cfg.cpu or (distributed and not torch.cuda.is_available())


def claim_output_dir(cfg: TrainConfig) -> RunLock | None:
    """Check and lock ``cfg.output_dir`` on the main process before anything is written; every process raises the
    same :class:`~ce_pretrain.config.ConfigError` if it is refused. Returns the lock on the main process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return prepare_output_dir(cfg)
    state = PartialState(cpu=_use_cpu(cfg))  # the process group, so that the others wait for the verdict
    lock, error = None, None
    if state.is_main_process:
        try:
            lock = prepare_output_dir(cfg)
        except ConfigError as e:
            error = str(e)
    if state.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise ConfigError(error)
    return lock


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from, or ``None`` when it starts from step 0."""
    if not cfg.resume:
        return None
    return latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else Path(cfg.resume)


def resume(accelerator: Accelerator, cfg: TrainConfig, state: TrainState,
           objective: ContextEncoderObjective) -> None:
    """Restore models, optimisers, RNGs and ``state`` from ``cfg.resume`` (``"latest"`` or a folder), if asked."""
    if not cfg.resume:
        return
    ckpt = checkpoint_to_resume(cfg)
    if ckpt is None:
        accelerator.print(f"no checkpoint in {checkpoint_dir(cfg.output_dir)}; starting from scratch")
        return
    changes = check_resumable(ckpt, cfg)
    load_checkpoint(accelerator, ckpt, state)
    accelerator.print(f"resumed from {ckpt} at step {state.step}")
    if changes:  # asked for with --allow-recipe-change; kept in run.json, the summary and the model card
        state.recipe_changes.append({"step": state.step, "changes": changes})
        objective.apply_flag_settings()  # the checkpoint's optimiser state brought back its own lr, betas, decay
        accelerator.print(f"from step {state.step} on, with a changed recipe: {describe_changes(changes)}")
    if state.step >= cfg.max_steps:
        accelerator.print(f"the checkpoint is at step {state.step}, at or past --max-steps {cfg.max_steps}: nothing "
                          f"to train; the model is written as it stands (raise --max-steps to go on)")


def make_loader(cfg: TrainConfig, items, image_column: str | None, accelerator: Accelerator, start_step: int):
    """The data loader of this process, positioned after the ``start_step`` steps already taken."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    rank, world, start_at = accelerator.process_index, accelerator.num_processes, start_step * per_step
    if cfg.data_cache:
        dataset = ImageDataset(items, cfg.image_size, seed=cfg.seed, image_column=image_column)
        with accelerator.main_process_first():  # one process builds the cache, the others then open it
            cache, meta = open_cache(dataset, cfg.data_cache, num_workers=cfg.num_workers)
        return CachedCrops(cache, cfg.image_size, cfg.batch_size, accelerator.device, seed=cfg.seed, rank=rank,
                           world_size=world, start=start_at, unreadable=meta["unreadable"], augment=cfg.augment)
    if cfg.streaming:
        dataset = StreamingImageDataset(items, cfg.image_size, image_column, seed=cfg.seed, rank=rank,
                                        world_size=world, start=start_at, augment=cfg.augment)
        sampler, workers = None, min(cfg.num_workers, 1)
    else:
        dataset = ImageDataset(items, cfg.image_size, seed=cfg.seed, image_column=image_column,
                               cache=len(items) <= 256, augment=cfg.augment)
        sampler = EpochSampler(len(items), seed=cfg.seed, rank=rank, world_size=world, start=start_at)
        workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None, worker_init_fn=_leave_signals_to_the_main_process,
    )


def _leave_signals_to_the_main_process(_worker_id: int) -> None:
    """Loader workers ignore Ctrl-C / SIGTERM sent to the whole process group: the main process finishes its step
    (which may need their next batch) and shuts them down; they exit by themselves if it dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def fixed_images(cfg: TrainConfig, items, image_column: str | None, n: int) -> torch.Tensor:
    """Up to ``n`` training crops, the same on every call and every process: float ``[N, 3, S, S]`` in [0, 1]."""
    if cfg.streaming:
        stream = StreamingImageDataset(items, cfg.image_size, image_column, seed=cfg.seed + 1, buffer_size=1)
        crops = [crop for crop, _ in itertools.islice(iter(stream), n)]
    else:
        dataset = ImageDataset(items, cfg.image_size, seed=cfg.seed, image_column=image_column)
        n = min(n, len(dataset))  # spread over the (sorted) data: not n images of its first folder
        crops = [dataset[(0, i * len(dataset) // n)][0] for i in range(n)]
    return torch.from_numpy(np.stack(crops)).float().div(255)


def sample_batch(cfg: TrainConfig, items, image_column: str | None, objective: ContextEncoderObjective,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch with fixed masks for the sample grids, so that they are comparable over time."""
    images = fixed_images(cfg, items, image_column, 6).to(device)
    return images, objective.masks(len(images), cfg.seed, device)


def should_stop(accelerator: Accelerator, stop: StopRequest | None, step: int) -> int:
    """Whether every process stops after ``step``: 0 = go on, else :meth:`StopRequest.code` of the strongest wish.

    One process reads its own flags (no device work). Several agree through an all-reduce (max) every
    :data:`STOP_SYNC_EVERY` steps, at the same steps on every rank, so that all of them stop after the same step
    and the collective cannot deadlock.
    """
    return agreed(stop, accelerator.device, sync=step % STOP_SYNC_EVERY == 0)


def train_loop(cfg: TrainConfig, accelerator: Accelerator, objective: ContextEncoderObjective, loader,
               state: TrainState, samples: tuple[torch.Tensor, torch.Tensor] | None,
               stop: StopRequest | None = None) -> tuple[dict, int, float, int]:
    """Optimise until ``cfg.max_steps`` or a stop request; returns (last logged scalars, images seen, seconds,
    stop code: 0 = finished, 1 = ``--max-time``, 128 + N = signal N)."""
    out, device = Path(cfg.output_dir), accelerator.device
    sample_every = cfg.sample_every or cfg.checkpoint_every
    check_every = cfg.check_finite_every or cfg.log_every
    objective.monitor = NonFiniteMonitor(device, state.nonfinite)
    step = GraphedStep(objective) if cfg.cuda_graph else objective.step
    scheduled = cfg.lr_schedule != "constant" or cfg.warmup_steps > 0  # else the rates stay as built
    schedule_steps = cfg.schedule_steps or cfg.max_steps
    batches = iter(loader)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc="ce-pretrain", dynamic_ncols=True, unit="step")
    start, images_seen, last, stopped = time.perf_counter(), 0, {}, 0
    try:
        while state.step < cfg.max_steps:
            # nothing in this loop waits for the device except the reads every `check_every` / `log_every` steps
            if scheduled:
                objective.scale_lr(lr_factor(state.step, cfg.lr_schedule, cfg.warmup_steps, schedule_steps))
            for micro in range(cfg.gradient_accumulation_steps):
                crops, bad = next(batches)
                state.skipped.update(bad)
                images = crops.to(device, non_blocking=True).float().div_(255)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                seed = step_seed(cfg.seed, state.step, micro, accelerator.process_index)
                mask = objective.masks(len(images), seed, device)
                torch.manual_seed(seed)  # dropout: the same draws in a resumed run
                loss, logs = step(images, mask)
                images_seen += len(images) * accelerator.num_processes
            state.step += 1
            bar.update(1)
            checkpoint_due = state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps
            if state.step % check_every == 0 or state.step == cfg.max_steps or checkpoint_due:
                check_nonfinite(cfg, accelerator, objective, state)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                names = [*logs, "loss"]
                values = torch.stack([*(v.detach().float() for v in logs.values()), loss.detach().float()])
                last = dict(zip(names, values.tolist()))  # one sync for every logged scalar
                ips = images_seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{ips:.1f}")
                accelerator.log(last | {"images_per_s": ips, "lr": objective.lr,
                                        "skipped_files": len(state.skipped)}, step=state.step)
            if checkpoint_due:
                ensure_finite_weights(cfg, objective, state)
                save_checkpoint(accelerator, cfg, state)
            if samples is not None and state.step % sample_every == 0:
                save_sample_grid(objective.core, *samples, out / "samples" / f"step_{state.step:08d}.png")
            if state.step < cfg.max_steps and (stopped := should_stop(accelerator, stop, state.step)):
                check_nonfinite(cfg, accelerator, objective, state)  # the checkpoint carries the skip count
                if not last:  # the summary names the loss the run stopped at
                    last = {k: v.item() for k, v in logs.items()} | {"loss": loss.item()}
                break
    finally:
        bar.close()
    return last, images_seen, time.perf_counter() - start, stopped


def check_nonfinite(cfg: TrainConfig, accelerator: Accelerator, objective: ContextEncoderObjective,
                    state: TrainState) -> None:
    """Read the device's count of skipped steps (one sync) and stop the run once ``cfg.max_nonfinite_steps`` of
    them followed each other."""
    counts = objective.monitor.read()
    if accelerator.num_processes > 1:  # under fp16 each process counts its own loss: agree on the worst
        gathered = accelerator.gather(torch.tensor([counts], device=accelerator.device))
        counts = tuple(int(v) for v in gathered.amax(0).tolist())
    state.nonfinite, longest, total = counts
    if total:
        accelerator.print(f"step {state.step}: {total} step(s) since the last check had a non-finite loss or "
                          f"gradients and were skipped (weights unchanged; {longest} in a row at most)")
    if longest >= cfg.max_nonfinite_steps:
        raise FloatingPointError(
            f"the loss or gradients were non-finite for {longest} steps in a row by step {state.step}: training "
            f"diverged (mixed precision {cfg.mixed_precision!r}); try --mixed-precision bf16 or no, a lower --lr, "
            f"or --adversarial-weight 0. {_last_good(cfg)}"
        )


def ensure_finite_weights(cfg: TrainConfig, objective: ContextEncoderObjective, state: TrainState) -> None:
    """Refuse to save weights or optimiser state that hold NaN or inf (one sync; before every save)."""
    if not all_finite(objective.state_tensors()):
        raise FloatingPointError(f"the weights or optimiser state became non-finite by step {state.step}; nothing "
                                 f"was saved from this point. {_last_good(cfg)}")


def _last_good(cfg: TrainConfig) -> str:
    ckpt = latest_checkpoint(cfg.output_dir)  # every saved checkpoint passed ensure_finite_weights
    if ckpt is None:
        return "No checkpoint was saved before it."
    return (f"The last finite checkpoint is {ckpt} (--resume {ckpt} --lr LOWER --allow-recipe-change continues "
            f"from it).")


def finish(cfg: TrainConfig, accelerator: Accelerator, objective: ContextEncoderObjective, state: TrainState,
           summary: dict, samples: tuple[torch.Tensor, torch.Tensor] | None, resume_command: str | None = None) -> None:
    """Final checkpoint, model + card, timm export, sample grid, summary, and the Hub push if asked.

    A run stopped early (``summary["stopped"]``) writes the same files, says how to continue, and is not pushed.
    """
    out, log, core = Path(cfg.output_dir), accelerator.print, objective.core
    ensure_finite_weights(cfg, objective, state)
    save_checkpoint(accelerator, cfg, state)
    if not accelerator.is_main_process:
        return
    card = {"preset": cfg.preset, "data": cfg.data or "built-in demo photographs", "mask": cfg.mask,
            "mask_shapes": cfg.mask_shapes, "loss": cfg.loss, "adversarial_weight": cfg.adversarial_weight,
            "optimizer": f"Adam(lr={cfg.lr}, betas=({cfg.beta1}, 0.999))", "lr_schedule": _schedule_text(cfg),
            "augment": cfg.augment, "steps": state.step,
            "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
            "mixed_precision": cfg.mixed_precision, "processes": accelerator.num_processes,
            "images_per_second": summary["images_per_second"], "final_loss": summary["final"].get("loss"),
            "seed": cfg.seed}
    if state.recipe_changes:
        card["changed_on_resume"] = "; ".join(f"from step {c['step']}: {describe_changes(c['changes'])}"
                                              for c in state.recipe_changes)
    # the Hub mixin writes in place: stage its files beside the run and rename each one, so that a kill (or a
    # second Ctrl-C) mid-save leaves the previous model.safetensors / config.json whole
    staging = out / f".tmp-model-{os.getpid()}"
    for leftover in [*out.glob(".tmp-model-*"), staging]:  # a killed save's (the run's lock: no other writer)
        shutil.rmtree(leftover, ignore_errors=True)
    core.save_pretrained(staging, model_card_kwargs=dict(training=card, repo_id=cfg.hub_model_id))
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    save_timm_encoder(core, out / "timm-encoder")
    if samples is not None:
        save_sample_grid(core, *samples, out / "samples" / "final.png")
    write_text_atomic(out / "train_summary.json", json.dumps(summary, indent=2, default=str))
    skipped = summary["skipped_files"]
    if skipped:
        log(f"skipped {len(skipped)} unreadable image file(s): {', '.join(skipped[:10])}"
            + (" ..." if len(skipped) > 10 else ""))
    if summary.get("stopped"):
        log(f"stopped ({summary['stopped']}) after step {state.step} of {cfg.max_steps}: checkpoint in "
            f"{latest_checkpoint(out)}, the model as it stands in {out}; continue with:\n  "
            f"{resume_command or 'the same command'}" + ("" if resume_command else " plus --resume"))
        return
    log(f"done: {state.step} steps, {summary['images_per_second']} images/s; model in {out} "
        f"(ContextEncoder.from_pretrained), timm encoder in {out / 'timm-encoder'}")
    if cfg.push_to_hub:
        from huggingface_hub import HfApi  # only a Hub push needs the network

        api = HfApi()
        repo = api.create_repo(cfg.hub_model_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(out), ignore_patterns=["checkpoints/*", "logs/*", "*.tmp"],
                          commit_message=f"ce-pretrain: {cfg.backbone}, {state.step} steps")
        log(f"pushed to https://huggingface.co/{repo}")


def _schedule_text(cfg: TrainConfig) -> str:
    warmup = f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else ""
    length = f" over {cfg.schedule_steps or cfg.max_steps} steps" if cfg.lr_schedule != "constant" else ""
    return f"{cfg.lr_schedule}{length}{warmup}"


def run(cfg: TrainConfig, items, image_column: str | None, description: str,
        resume_command: str | None = None) -> dict:
    """Run (or resume) a pretraining; returns the summary also written to ``train_summary.json``.

    SIGINT / SIGTERM and ``cfg.max_time`` end the run after the current step with a checkpoint and the model as
    it stands; ``summary["exit_code"]`` is then 128 + the signal's number, or 0 for the time budget.

    Args:
        cfg: a checked configuration (:func:`ce_pretrain.config.resolve_config`).
        items: what :func:`ce_pretrain.sources.open_source` returned for ``cfg.data``.
        image_column: the image column of a Hugging Face dataset, else ``None``.
        description: the data source in words, for logs and the summary.
        resume_command: the command line that continues this run, printed when it stops early.
    """
    with StopRequest(cfg.max_time) as stop:
        lock = claim_output_dir(cfg)
        try:
            return _run(cfg, items, image_column, description, resume_command, stop)
        finally:
            if lock is not None:
                lock.release()


def _run(cfg: TrainConfig, items, image_column: str | None, description: str, resume_command: str | None,
         stop: StopRequest) -> dict:
    try:  # before the accelerator, which creates the log folder: a refused run leaves --output-dir as it was
        shapes = ShapeBank.from_folder(cfg.mask_shapes) if cfg.mask_shapes else None
    except (ValueError, OSError) as err:
        raise ConfigError(f"--mask-shapes: {err}") from None
    accelerator = make_accelerator(cfg)
    if cfg.cuda_graph and (reason := check_supported(accelerator)):
        raise ConfigError(reason)
    accelerator.print(f"data: {description}")
    set_seed(cfg.seed)
    # --encoder-init rescale: calibrate the encoder on real images before the first step (not when resuming)
    init_images = fixed_images(cfg, items, image_column, RESCALE_IMAGES) \
        if cfg.encoder_init == "rescale" and checkpoint_to_resume(cfg) is None else None
    objective = ContextEncoderObjective.build(cfg, accelerator, shapes, init_images=init_images)
    state = TrainState()  # saved as JSON in run.json, not registered with accelerate (that would be a pickle)
    resume(accelerator, cfg, state, objective)
    if not cfg.cuda_graph:  # a --cuda-graph checkpoint stores its rates as tensors
        for opt in objective.optimizers:
            plain_rates(opt)
    start_step = state.step
    loader = make_loader(cfg, items, image_column, accelerator, start_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("ce_pretrain", config=tracker_config(cfg))
    samples = sample_batch(cfg, items, image_column, objective, accelerator.device) \
        if accelerator.is_main_process else None

    last, images_seen, elapsed, stopped = train_loop(cfg, accelerator, objective, loader, state, samples, stop)

    summary = {
        "steps": state.step, "resumed_from_step": start_step, "seconds": round(elapsed, 2),
        "images_per_second": round(images_seen / max(elapsed, 1e-9), 2), "final": last,
        "skipped_files": sorted(set().union(*gather_object([state.skipped]))), "data": description,
        "processes": accelerator.num_processes, "mixed_precision": cfg.mixed_precision,
        "config": dataclasses.asdict(cfg), "exit_code": exit_status(stopped),
        "stopped": describe(stopped), "recipe_changes": state.recipe_changes,
    }
    finish(cfg, accelerator, objective, state, summary, samples, resume_command)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
