"""Resumable checkpoints of a fine-tuning run, written atomically and read back without unpickling anything.

A checkpoint is a folder ``checkpoints/step-000123/`` holding ``model.safetensors`` (the unwrapped model),
``optimizer.safetensors`` + ``state.json`` (every optimizer tensor; param groups, scheduler, scaler, loop position
and the run's config as JSON) and ``rng-<rank>.safetensors`` (each process's generator states and running
sums). It is written under a temporary name and renamed into place, so a kill at any moment leaves the previous
checkpoint whole; only the newest is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ce_pretrain.atomic import complete_dirs, remove_dir, remove_leftovers, replace_dir

from .cli import UsageError

__all__ = ["CHECKPOINTS", "latest_checkpoint", "load_snapshot", "restore_generators", "save_snapshot"]

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir/checkpoints``, or None (see
    ``ce_pretrain.atomic.complete_dirs``: a kill mid-swap leaves a whole copy that is returned in its place)."""
    done = complete_dirs(Path(output_dir) / CHECKPOINTS, _PREFIX, "state.json")
    return done[max(done)] if done else None


def _optimizer_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` → tensors (``"<param>.<name>"``) and the JSON rest."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_generators(tensors: dict[str, torch.Tensor]) -> None:
    """Set torch's CPU (and, with as many devices as saved, CUDA) generators from a snapshot's tensors."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_snapshot(accelerator, output_dir: Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                  rank_tensors: dict[str, torch.Tensor]) -> Path:
    """Write the checkpoint of ``step`` (every process calls this; the main one writes the shared files).

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run's folder.
        step: optimizer steps done.
        model: the unwrapped model.
        optimizer: the (prepared) optimizer.
        state: JSON-typed loop state (scheduler, scaler, sampler position, config, ...).
        rank_tensors: this process's tensors to restore (running sums); its generator states are added here.

    Returns:
        The checkpoint folder.
    """
    final = output_dir / CHECKPOINTS / f"{_PREFIX}{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        remove_leftovers(final.parent)  # of a killed save (one run per folder: no other writer)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file({**_rng_tensors(), **{k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()}},
              str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    optimizer_tensors, optimizer_rest = _optimizer_split(optimizer.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(model, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": optimizer_rest,
                                                    "world_size": accelerator.num_processes}, indent=1))
        replace_dir(tmp, final)  # a checkpoint of the same step is swapped, never deleted first
        for old in (output_dir / CHECKPOINTS).glob(f"{_PREFIX}*"):
            if old != final:
                remove_dir(old)
    accelerator.wait_for_everyone()
    return final


def load_snapshot(accelerator, checkpoint: Path, model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer from ``checkpoint``; the generators are left to :func:`restore_generators`
    because the caller must set them at the moment the snapshot took them (after creating its data iterator).

    Returns:
        ``(state, rank_tensors)``: the JSON loop state and this process's saved tensors.

    Raises:
        UsageError: the folder is not a complete checkpoint or was written by another number of processes.
    """
    state_file = checkpoint / "state.json"
    if not state_file.is_file():
        raise UsageError(f"--resume {str(checkpoint)!r} is not a checkpoint folder (no state.json)")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{str(state_file)!r} is not valid JSON: {err}") from None
    if state.get("world_size", 1) != accelerator.num_processes:
        raise UsageError(f"checkpoint {str(checkpoint)!r} was written by {state.get('world_size')} processes; "
                         f"resume with the same number (now {accelerator.num_processes})")
    rank_file = checkpoint / f"rng-{accelerator.process_index}.safetensors"
    try:
        # read to the CPU, then copied into the parameters wherever they live
        missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=False, device="cpu")
        if missing or unexpected:
            raise UsageError(f"checkpoint {str(checkpoint)!r} does not fit the model: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors")
        optimizer.load_state_dict(_optimizer_join(load_file(str(checkpoint / "optimizer.safetensors")),
                                                  state["optimizer"]))
        rank_tensors = load_file(str(rank_file))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # missing, truncated or mismatched files
        raise UsageError(f"cannot resume from {str(checkpoint)!r}: {str(err).splitlines()[0]}") from None
    return state, rank_tensors
