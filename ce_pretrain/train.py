"""Context-encoder pretraining under Hugging Face accelerate.

    accelerate launch ce_pretrain/train.py --backbone alexnet            # the paper's feature-learning recipe
    accelerate launch ce_pretrain/train.py --preset inpainting           # the semantic-inpainting recipe (§5.1)
    python ce_pretrain/train.py --backbone resnet50 --data /imagenet/train --mixed-precision bf16

accelerate owns devices, precision and processes: the same script runs on a CPU, one GPU, or many nodes. With no
``--data`` it trains on a small built-in sample of real photographs (a demo, not a real run).

Outputs in ``--output-dir``: ``config.json`` + ``model.safetensors`` + ``README.md`` (``ContextEncoder.from_pretrained``),
``timm-encoder/`` (the encoder in timm's layout), ``checkpoints/step_*`` (``accelerator.save_state``, written
atomically), ``samples/*.png`` (masked input | prediction | original), ``logs/`` and ``train_summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.tracking import GeneralTracker

PRESETS: dict[str, dict] = {
    # §5.2: AlexNet from scratch, random-region masks, L2 only (the adversarial loss diverged with AlexNet),
    # Adam with a constant 1e-4 (1e-3 for central masks), dropout 0.5 on the channel-wise FC, ~100K iterations.
    "features": dict(backbone="alexnet", image_size=227, pred_size=None, overlap=0, bottleneck="channel-fc",
                     mask="random-region", lr=1e-4, beta1=0.9, adversarial_weight=0.0, batch_size=64,
                     max_steps=100_000),
    # §5.1 and the original train.lua: DCGAN encoder, 4000-unit bottleneck, 128 px in, the 64 px centre out with a
    # 7 px overlap weighted 10×, λrec 0.999 / λadv 0.001, Adam β1 0.5, generator lr 10× the discriminator's 2e-4.
    "inpainting": dict(backbone="dcgan_encoder", image_size=128, pred_size=64, overlap=7, bottleneck="fc",
                       mask="center", lr=2e-3, beta1=0.5, adversarial_weight=0.001, batch_size=64,
                       max_steps=100_000),
}
DEMO_MAX_STEPS = 200
DEMO_BATCH_SIZE = 16
MASK_CHOICES = ("center", "random-block", "random-region", "none")


class ConfigError(ValueError):
    """Flags that cannot work together, or a bad data source / backbone, found before any model is built."""


@dataclass
class TrainConfig:
    """Every knob of a run; a checkpoint carries it so a resumed run can check it continues the same run."""

    preset: str = "features"
    backbone: str = "alexnet"
    data: str | None = None
    data_split: str = "train"
    streaming: bool = False
    image_size: int = 227
    pred_size: int | None = None
    overlap: int = 0
    bottleneck: str = "channel-fc"
    mask: str = "random-region"
    mask_shapes: str | None = None
    mask_source: str = "procedural"
    loss: str = "l2"
    batch_size: int = 64
    max_steps: int = 100_000
    lr: float = 1e-4
    beta1: float = 0.9
    weight_decay: float = 0.0
    discriminator_lr: float | None = None
    adversarial_weight: float = 0.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    output_dir: str = "runs/ce-pretrain"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int | None = None
    log_every: int = 10
    resume: str | None = None
    seed: int = 0
    log_with: list[str] = field(default_factory=lambda: ["csv"])
    push_to_hub: bool = False
    hub_model_id: str | None = None
    num_workers: int = 4
    max_nonfinite_steps: int = 20
    channels_last: bool = True
    cpu: bool = False

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    def model_kwargs(self) -> dict:
        return dict(backbone=self.backbone, image_size=self.image_size, pred_size=self.pred_size,
                    overlap=self.overlap, bottleneck=self.bottleneck)


# ------------------------------------------------------------------------------------------------------ flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ce_pretrain/train.py",
        description="Context-encoder pretraining (Pathak et al., CVPR 2016) of any timm backbone under accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", choices=list(PRESETS), default="features",
                   help="the paper's recipes: 'features' (§5.2, AlexNet, random regions, L2) or 'inpainting' "
                        "(§5.1, DCGAN encoder, 128 px → 64 px centre, L2 + adversarial); flags below override it")
    g.add_argument("--backbone", help="timm architecture name (alexnet, resnet50, convnext_tiny, ...); "
                                      "default: the preset's")
    g.add_argument("--image-size", type=int, help="input side in px; default: the preset's (227 / 128)")
    g.add_argument("--mask", choices=MASK_CHOICES,
                   help="region masks (§3.3); 'none' trains the paper's autoencoder baseline; default: the preset's")
    g.add_argument("--mask-shapes", metavar="DIR",
                   help="folder of segmentation masks (e.g. VOC2012 SegmentationObject/) whose objects become "
                        "random regions; default: procedurally generated shapes")
    g.add_argument("--mask-source", choices=["procedural", "noise"], default="procedural",
                   help="random-region shapes when no --mask-shapes: star-shaped blobs or the original code's "
                        "thresholded noise")
    g.add_argument("--loss", choices=["l2", "l1"], default="l2", help="reconstruction loss")
    g.add_argument("--adversarial-weight", type=float,
                   help="λadv of the joint loss (λrec = 1 − λadv); 0 disables the discriminator; default: the "
                        "preset's (0 / 0.001)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int,
                   help=f"images per process per step; default: the preset's (64), or {DEMO_BATCH_SIZE} on the demo set")
    o.add_argument("--max-steps", type=int,
                   help=f"optimizer steps; default: the preset's 100000, or {DEMO_MAX_STEPS} on the demo set")
    o.add_argument("--lr", type=float, help="Adam learning rate of the context encoder; default: the preset's")
    o.add_argument("--discriminator-lr", type=float, help="Adam learning rate of the discriminator; default: lr/10")
    o.add_argument("--beta1", type=float, help="Adam β1; default: the preset's (0.9 / 0.5)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision; default: accelerate's config (or 'no')")
    o.add_argument("--cpu", action="store_true",
                   help="train on CPU even if a GPU is present (multi-process runs on a machine without GPUs "
                        "use CPUs and gloo by themselves)")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, crops and masks")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="a folder of images (searched recursively: jpg, png, webp, bmp, tif), a "
                                  "dataset saved with datasets' save_to_disk, or a Hugging Face dataset name; "
                                  "default: the built-in demo photographs")
    d.add_argument("--data-split", default="train", help="split of a Hugging Face dataset")
    d.add_argument("--streaming", action="store_true",
                   help="stream a Hugging Face dataset instead of downloading it first (one loader worker)")
    d.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    r = p.add_argument_group("outputs")
    r.add_argument("--output-dir", default="runs/ce-pretrain", help="where checkpoints, samples, logs and the "
                                                                    "final model go")
    r.add_argument("--checkpoint-every", type=int, default=1000, help="save a resumable checkpoint every N steps")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    r.add_argument("--sample-every", type=int, help="save an inpainting grid every N steps; default: "
                                                    "--checkpoint-every")
    r.add_argument("--log-every", type=int, default=10, help="log scalars every N steps")
    r.add_argument("--log-with", default="csv",
                   help="comma-separated trackers: csv (built in), tensorboard, wandb, ... (any accelerate "
                        "tracker), or none")
    r.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output-dir, or from the given checkpoint folder")
    r.add_argument("--push-to-hub", action="store_true", help="upload the final model to the Hugging Face Hub")
    r.add_argument("--hub-model-id", help="Hub repository, e.g. user/ce-alexnet (needed with --push-to-hub)")
    o.add_argument("--max-nonfinite-steps", type=int, default=20,
                   help="stop with an error after this many consecutive steps with a non-finite loss")
    r.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW memory format (channels-last is faster on modern CPUs and GPUs)")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Merge the preset with the flags and check everything that can be checked without building a model."""
    preset = dict(PRESETS[args.preset])
    pick = {k: getattr(args, k) for k in ("backbone", "image_size", "mask", "lr", "beta1", "adversarial_weight",
                                          "batch_size") if getattr(args, k) is not None}
    preset.update(pick)
    if args.max_steps is not None:
        preset["max_steps"] = args.max_steps
    elif args.data is None:
        preset["max_steps"] = DEMO_MAX_STEPS
    if args.data is None and args.batch_size is None:
        preset["batch_size"] = DEMO_BATCH_SIZE  # 17 photographs: larger batches only repeat them
    if args.preset == "features" and preset["mask"] == "center" and args.lr is None:
        preset["lr"] = 1e-3  # §5.2: "a constant learning rate of 10⁻³ for the center-region masks"
    if args.preset == "inpainting" and args.image_size is not None:
        preset["pred_size"] = args.image_size // 2
    log_with = [t.strip() for t in args.log_with.split(",") if t.strip() and t.strip() != "none"]
    cfg = TrainConfig(
        preset=args.preset, data=args.data, data_split=args.data_split, streaming=args.streaming, mask_shapes=args.mask_shapes,
        mask_source=args.mask_source, loss=args.loss, discriminator_lr=args.discriminator_lr,
        weight_decay=args.weight_decay, gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or "no", output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        sample_every=args.sample_every, log_every=args.log_every, resume=args.resume, seed=args.seed,
        log_with=log_with, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
        num_workers=args.num_workers, channels_last=args.channels_last, max_nonfinite_steps=args.max_nonfinite_steps,
        cpu=args.cpu,
        **{k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__},
    )
    if args.mixed_precision is None:
        cfg.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for impossible combinations (before data or models are touched)."""
    positive = dict(batch_size=cfg.batch_size, max_steps=cfg.max_steps, image_size=cfg.image_size,
                    checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                    gradient_accumulation_steps=cfg.gradient_accumulation_steps, keep_checkpoints=cfg.keep_checkpoints)
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be ≥ 0, got {cfg.num_workers}")
    if not 0 <= cfg.adversarial_weight < 1:
        raise ConfigError(f"--adversarial-weight must be in [0, 1), got {cfg.adversarial_weight}")
    if cfg.image_size < 16:
        raise ConfigError(f"--image-size {cfg.image_size} is too small to crop and mask")
    if cfg.pred_size is not None and cfg.pred_size < cfg.image_size and cfg.mask not in ("center", "none"):
        raise ConfigError(
            f"--mask {cfg.mask} drops pixels anywhere, but the {cfg.preset} preset predicts only the "
            f"{cfg.pred_size}px centre; use --mask center, or --preset features for full-image prediction"
        )
    if cfg.mask_shapes and cfg.mask != "random-region":
        raise ConfigError(f"--mask-shapes only applies to --mask random-region (got --mask {cfg.mask})")
    if cfg.mask_shapes and not Path(cfg.mask_shapes).is_dir():
        raise ConfigError(f"--mask-shapes folder {cfg.mask_shapes!r} does not exist")
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("--push-to-hub needs --hub-model-id USER/NAME")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed precision {cfg.mixed_precision!r} is not one of no, fp16, bf16")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume checkpoint {cfg.resume!r} does not exist")
    if cfg.streaming and (cfg.data is None or Path(cfg.data).is_dir() and not _is_saved_dataset(cfg.data)):
        raise ConfigError("--streaming applies to Hugging Face datasets, not to image folders or the demo set")
    if cfg.adversarial and cfg.mask == "none":
        raise ConfigError("the autoencoder baseline (--mask none) has no hole for the adversarial loss to judge")


def _is_saved_dataset(path: str) -> bool:
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "dataset_dict.json"))


# ------------------------------------------------------------------------------------------------ checkpoints
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


# ---------------------------------------------------------------------------------------------------- logging
class CSVTracker(GeneralTracker):
    """accelerate tracker writing one CSV row per logged step (no dependency beyond the standard library)."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        import csv

        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(row)
            if self.path.exists() and self.path.stat().st_size:  # resumed: keep the header already written
                with open(self.path, newline="") as f:
                    self.columns = next(csv.reader(f), self.columns)
            else:
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(self.columns)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

    def finish(self) -> None:
        pass


def make_trackers(names: list[str], logging_dir: Path) -> list:
    return [CSVTracker("ce_pretrain", logging_dir) if n == "csv" else n for n in names]


# ---------------------------------------------------------------------------------------------------- samples
def save_sample_grid(model, images: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
    """Rows of (masked input | prediction blended into the context | original); written atomically."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(images, mask).float()
        filled = model.paste(pred.clamp(0, 1), images, mask if mask.any() else None)
    model.train(was_training)
    masked = torch.where(mask, model.mean.to(images.dtype), images)
    rows = torch.stack([masked, filled, images], 1).flatten(0, 1)  # [3B, 3, H, W]: triplets side by side
    grid = make_grid(rows.clamp(0, 1).cpu(), nrow=6 if len(images) > 1 else 3, padding=2, pad_value=1.0)
    from PIL import Image

    from ce_pretrain.figure import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")), path)


# ------------------------------------------------------------------------------------------------------- main
def _mask_batch(cfg: TrainConfig, batch: int, generator: torch.Generator, device, shapes) -> torch.Tensor:
    from ce_pretrain.masks import make_masks

    s = cfg.image_size
    if cfg.mask == "none":
        return torch.zeros(batch, 1, s, s, dtype=torch.bool, device=device)
    return make_masks(cfg.mask, batch, s, s, generator=generator, device=device,
                      source=shapes if shapes is not None else cfg.mask_source, overlap=cfg.overlap)


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63)


def train(cfg: TrainConfig, items, image_column: str | None, description: str) -> dict:
    """Run (or resume) training; returns the summary also written to ``train_summary.json``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from tqdm.auto import tqdm

    from ce_pretrain.data import EpochSampler, ImageDataset, StreamingImageDataset, collate
    from ce_pretrain.export import save_timm_encoder
    from ce_pretrain.masks import ShapeBank

    out = Path(cfg.output_dir)
    # torchrun-style launches (`accelerate launch --multi_gpu`, `torchrun`) on a machine without GPUs: DDP over gloo
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cfg.cpu or (distributed and not torch.cuda.is_available()),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=make_trackers(cfg.log_with, out / "logs") or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    log = accelerator.print
    log(f"data: {description}")
    set_seed(cfg.seed)
    device = accelerator.device

    runner = StepRunner.build(cfg, accelerator)
    core = runner.core
    shapes = ShapeBank.from_folder(cfg.mask_shapes) if cfg.mask_shapes else None

    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if cfg.resume:
        ckpt = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if ckpt is None:
            log(f"no checkpoint in {checkpoint_dir(out)}; starting from scratch")
        else:
            check_resumable(ckpt, cfg)
            accelerator.load_state(str(ckpt))
            log(f"resumed from {ckpt} at step {state.step}")

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    rank, world, start_at = accelerator.process_index, accelerator.num_processes, state.step * per_step
    if cfg.streaming:
        dataset = StreamingImageDataset(items, cfg.image_size, image_column, seed=cfg.seed, rank=rank,
                                        world_size=world, start=start_at)
        sampler, workers = None, min(cfg.num_workers, 1)
    else:
        dataset = ImageDataset(items, cfg.image_size, seed=cfg.seed, image_column=image_column,
                               cache=len(items) <= 256)
        sampler = EpochSampler(len(items), seed=cfg.seed, rank=rank, world_size=world, start=start_at)
        workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )
    batches = iter(loader)
    if accelerator.is_main_process:
        accelerator.init_trackers("ce_pretrain", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                         for k, v in dataclasses.asdict(cfg).items()})

    # a fixed batch with fixed masks for the sample grids, so they are comparable over time
    vis_images = vis_mask = None
    if accelerator.is_main_process:
        if cfg.streaming:
            vis = [crop for crop, _ in itertools.islice(iter(StreamingImageDataset(
                items, cfg.image_size, image_column, seed=cfg.seed + 1, buffer_size=1)), 6)]
        else:
            n = min(6, len(dataset))  # spread over the (sorted) data: not six images of its first folder
            vis = [dataset[(0, i * len(dataset) // n)][0] for i in range(n)]
        vis_images = torch.from_numpy(np.stack(vis)).to(device).float().div(255)
        vis_mask = _mask_batch(cfg, len(vis), torch.Generator().manual_seed(cfg.seed), device, shapes)
    sample_every = cfg.sample_every or cfg.checkpoint_every

    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
               desc="ce-pretrain", dynamic_ncols=True, unit="step")
    start, start_step, images_seen = time.perf_counter(), state.step, 0
    last = {}
    try:
        while state.step < cfg.max_steps:
            for micro in range(cfg.gradient_accumulation_steps):
                crops, bad = next(batches)
                state.skipped.update(bad)
                images = crops.to(device, non_blocking=True).float().div_(255)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                seed = _step_seed(cfg.seed, state.step, micro, accelerator.process_index)
                mask = _mask_batch(cfg, len(images), torch.Generator().manual_seed(seed), device, shapes)
                torch.manual_seed(seed)  # dropout: the same draws in a resumed run
                loss, logs, finite = runner.step(images, mask)
                if finite:
                    state.nonfinite = 0
                else:
                    state.nonfinite += 1
                    log(f"step {state.step}: non-finite loss ({loss.item()}); step skipped "
                        f"({state.nonfinite} in a row)")
                    if state.nonfinite >= cfg.max_nonfinite_steps:
                        raise FloatingPointError(
                            f"the loss was non-finite for {state.nonfinite} steps in a row at step {state.step}: "
                            f"training diverged (mixed precision {cfg.mixed_precision!r}); try --mixed-precision "
                            f"bf16 or no, a lower --lr, or --adversarial-weight 0. The last good checkpoint is in "
                            f"{checkpoint_dir(out)}"
                        )
                images_seen += len(images) * accelerator.num_processes
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:  # .item() syncs: only when logging
                last = {k: v.item() for k, v in logs.items()} | {"loss": loss.item()}
                ips = images_seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{ips:.1f}")
                accelerator.log(last | {"images_per_s": ips, "lr": runner.opt_g.param_groups[0]["lr"],
                                        "skipped_files": len(state.skipped)}, step=state.step)
            if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
                save_checkpoint(accelerator, cfg, state.step)
            if accelerator.is_main_process and state.step % sample_every == 0:
                save_sample_grid(core, vis_images, vis_mask, out / "samples" / f"step_{state.step:08d}.png")
    finally:
        bar.close()

    skipped = sorted(set().union(*gather_object([state.skipped])))
    elapsed = time.perf_counter() - start
    summary = {
        "steps": state.step, "resumed_from_step": start_step, "seconds": round(elapsed, 2),
        "images_per_second": round(images_seen / max(elapsed, 1e-9), 2), "final": last,
        "skipped_files": skipped, "data": description, "processes": accelerator.num_processes,
        "mixed_precision": cfg.mixed_precision, "config": dataclasses.asdict(cfg),
    }
    save_checkpoint(accelerator, cfg, state.step)
    if accelerator.is_main_process:
        card = {"preset": cfg.preset, "data": cfg.data or "built-in demo photographs", "mask": cfg.mask,
                "mask_shapes": cfg.mask_shapes, "loss": cfg.loss, "adversarial_weight": cfg.adversarial_weight,
                "optimizer": f"Adam(lr={cfg.lr}, betas=({cfg.beta1}, 0.999))", "steps": state.step,
                "global_batch": cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
                "mixed_precision": cfg.mixed_precision, "processes": accelerator.num_processes,
                "images_per_second": summary["images_per_second"], "final_loss": last.get("loss"),
                "seed": cfg.seed}
        core.save_pretrained(out, model_card_kwargs=dict(training=card, repo_id=cfg.hub_model_id))
        save_timm_encoder(core, out / "timm-encoder")
        save_sample_grid(core, vis_images, vis_mask, out / "samples" / "final.png")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if skipped:
            log(f"skipped {len(skipped)} unreadable image file(s): {', '.join(skipped[:10])}"
                + (" ..." if len(skipped) > 10 else ""))
        log(f"done: {state.step} steps, {summary['images_per_second']} images/s; model in {out} "
            f"(ContextEncoder.from_pretrained), timm encoder in {out / 'timm-encoder'}")
        if cfg.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            repo = api.create_repo(cfg.hub_model_id, exist_ok=True).repo_id
            api.upload_folder(repo_id=repo, folder_path=str(out), ignore_patterns=["checkpoints/*", "logs/*", "*.tmp"],
                              commit_message=f"ce-pretrain: {cfg.backbone}, {state.step} steps")
            log(f"pushed to https://huggingface.co/{repo}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class StepRunner:
    """One optimisation step of the context encoder (and its discriminator): the part of the loop that computes.

    Build it with :meth:`build`, which creates the models and optimisers and hands them to ``accelerator.prepare``.
    """

    def __init__(self, cfg: TrainConfig, accelerator, model, disc, opt_g, opt_d):
        from ce_pretrain.losses import ReconstructionLoss

        self.cfg, self.accelerator = cfg, accelerator
        self.model, self.disc, self.opt_g, self.opt_d = model, disc, opt_g, opt_d
        self.core = accelerator.unwrap_model(model)
        self.rec_loss = ReconstructionLoss(p=2 if cfg.loss == "l2" else 1)

    @classmethod
    def build(cls, cfg: TrainConfig, accelerator) -> StepRunner:
        from ce_pretrain.discriminator import Discriminator
        from ce_pretrain.model import ContextEncoder

        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = ContextEncoder(**cfg.model_kwargs()).to(memory_format=memory)
        opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999),
                                 weight_decay=cfg.weight_decay, fused=_fused_adam(accelerator))
        if not cfg.adversarial:
            model, opt_g = accelerator.prepare(model, opt_g)
            return cls(cfg, accelerator, model, None, opt_g, None)
        disc = Discriminator(model.pred_size).to(memory_format=memory)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.discriminator_lr or cfg.lr / 10, betas=(cfg.beta1, 0.999),
                                 fused=_fused_adam(accelerator))
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
        return cls(cfg, accelerator, model, disc, opt_g, opt_d)

    def step(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict, bool]:
        """images ``[B, 3, H, W]`` in [0, 1], mask bool ``[B, 1, H, W]`` → (loss, logged terms, finite?).

        A non-finite loss (on any process) skips the backward pass, so the step leaves the weights unchanged.
        """
        from ce_pretrain.losses import discriminator_loss, generator_adversarial_loss, joint_loss, loss_weights

        cfg, acc, core = self.cfg, self.accelerator, self.core
        weights = core.crop(torch.ones_like(mask, dtype=torch.float) if cfg.mask == "none"
                            else loss_weights(mask, cfg.overlap))
        target = core.crop(images)
        with acc.accumulate(*([self.model, self.disc] if self.disc is not None else [self.model])):
            with acc.autocast():
                pred = self.model(images, mask)
            rec = self.rec_loss(pred, target, weights)
            logs = {"loss/reconstruction": rec}
            loss = rec
            if self.disc is not None:
                fake, real = core.normalize(pred.float()), core.normalize(target)
                with acc.autocast():  # one forward for real and fake: DDP-safe, and BatchNorm sees both
                    logits = self.disc(torch.cat([real, fake.detach()]))
                d_loss = discriminator_loss(logits[: len(real)], logits[len(real):])
                if _all_finite(acc, d_loss):
                    acc.backward(d_loss)
                    self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)
                with acc.autocast():
                    adv = generator_adversarial_loss(self.disc(fake))
                loss = joint_loss(rec, adv, 1 - cfg.adversarial_weight, cfg.adversarial_weight)
                logs.update({"loss/adversarial": adv, "loss/discriminator": d_loss})
            finite = _all_finite(acc, loss)
            if finite:
                acc.backward(loss)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
        return loss, logs, finite


def _fused_adam(accelerator) -> bool | None:
    """Fused Adam (one kernel over all parameters) where PyTorch has it: CPU and CUDA."""
    return True if accelerator.device.type in ("cpu", "cuda") else None


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    """True when the loss is finite on every process (so all processes skip a bad step together)."""
    flag = torch.isfinite(value.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, check them and the data source, then train. Bad input: one line on stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        from ce_pretrain.data import DataSourceError, open_source
        from ce_pretrain.model import UnknownBackboneError, resolve_backbone_name

        try:
            resolve_backbone_name(cfg.backbone)
            items, column, description = open_source(cfg.data, cfg.data_split, streaming=cfg.streaming)
        except (DataSourceError, UnknownBackboneError) as e:
            raise ConfigError(str(e)) from e
        if cfg.resume not in (None, "latest"):
            if not (Path(cfg.resume) / "run.json").is_file():
                raise ConfigError(f"--resume {cfg.resume!r} is not a checkpoint folder (no run.json)")
            check_resumable(Path(cfg.resume), cfg)
        elif cfg.resume == "latest" and (ckpt := latest_checkpoint(cfg.output_dir)) is not None:
            check_resumable(ckpt, cfg)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg, items, column, description)
    except FloatingPointError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
