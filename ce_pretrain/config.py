"""A training run's configuration: the paper's presets, the flags that override them, and their validation.

``TrainConfig`` holds every knob of a run; a checkpoint carries it, so a resumed run can check that it continues
the same run. :func:`build_parser` and :func:`resolve_config` turn command-line flags into a checked config before
any data or model is touched (bad input: :class:`ConfigError`, one line).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .augment import AUGMENTS, RRC_SCALE
from .layers import DECODER_NORMS
from .masks import TRAIN_MASK_KINDS
from .schedule import SCHEDULES

__all__ = ["DEMO_BATCH_SIZE", "DEMO_MAX_STEPS", "ENCODER_INITS", "PRESETS", "ConfigError", "TrainConfig",
           "build_parser", "check_backbone_size", "default_image_size", "parse_duration", "resolve_config", "validate"]

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
MASK_CHOICES = TRAIN_MASK_KINDS
# torch.compile modes --compile takes ("reduce-overhead" captures CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the encoder's weights at step 0: the backbone's own initialisation (timm's), or that rescaled from real images
ENCODER_INITS = ("backbone", "rescale")


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
    data_cache: str | None = None
    image_size: int = 227
    pred_size: int | None = None
    overlap: int = 0
    bottleneck: str = "channel-fc"
    mask: str = "random-region"
    mask_shapes: str | None = None
    mask_source: str = "procedural"
    loss: str = "l2"
    high_pass_weight: float = 0.0
    augment: str = "crop"
    decoder_norm: str = "batch"
    fc_dropout: float = 0.5
    encoder_init: str = "backbone"
    batch_size: int = 64
    max_steps: int = 100_000
    lr: float = 1e-4
    beta1: float = 0.9
    weight_decay: float = 0.0
    discriminator_lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    schedule_steps: int | None = None
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
    check_finite_every: int | None = None
    channels_last: bool = True
    compile: str | None = None
    cuda_graph: bool = False
    cpu: bool = False
    max_time: float | None = None
    overwrite: bool = False
    allow_recipe_change: bool = False

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    def model_kwargs(self) -> dict:
        return dict(backbone=self.backbone, image_size=self.image_size, pred_size=self.pred_size,
                    overlap=self.overlap, bottleneck=self.bottleneck, mask=self.mask, dropout=self.fc_dropout,
                    decoder_norm=self.decoder_norm)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"20m"``, ``"1h30m"``, ``"1h30m15s"`` → seconds.

    Raises:
        ConfigError: for anything else, or a duration that is not positive.
    """
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise ConfigError(f"--max-time {text!r} is not a duration: use seconds (5400), or h/m/s as in 20m, "
                              "1h30m, 45s") from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"--max-time must be a positive duration, got {text!r}")
    return seconds


class OneLineParser(argparse.ArgumentParser):
    """Bad flags (an unknown choice, a non-number) end with one line and exit status 2, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "ce_pretrain/train.py") -> argparse.ArgumentParser:
    """The training flags; each recipe flag defaults to the preset's value (``None`` here)."""
    p = OneLineParser(
        prog=prog,
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
    g.add_argument("--high-pass-weight", type=float, default=0.0,
                   help="add this weight times the reconstruction error of the images minus their 7×7 local mean "
                        "(edges and texture; cf. MAE's normalised-pixel targets); 0: the paper's loss")
    g.add_argument("--adversarial-weight", type=float,
                   help="λadv of the joint loss (λrec = 1 − λadv); 0 disables the discriminator; default: the "
                        "preset's (0 / 0.001)")
    g.add_argument("--decoder-norm", choices=DECODER_NORMS, default="batch",
                   help="normalisation after each up-convolution of the decoder: BatchNorm (DCGAN's, as the original "
                        "code), or none (§3.1 names only ReLUs); stored in the model's config.json")
    g.add_argument("--fc-dropout", type=float,
                   help="dropout on the channel-wise fully-connected layer (§5.2: 0.5); 0 disables it; stored in "
                        "the model's config.json; default 0.5")
    g.add_argument("--encoder-init", choices=ENCODER_INITS, default="backbone",
                   help="the encoder's weights at step 0: the backbone's own random initialisation (timm's), or "
                        "that initialisation rescaled on 64 training images (Krähenbühl et al., ICLR 2016; the "
                        "transfer's --rescale), so that pretraining starts where the rescaled random baseline "
                        "starts; a resumed run takes its weights from the checkpoint either way")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int,
                   help=f"images per process per step; default: the preset's (64), or {DEMO_BATCH_SIZE} on the "
                        "demo set")
    o.add_argument("--max-steps", type=int,
                   help=f"optimizer steps; default: the preset's 100000, or {DEMO_MAX_STEPS} on the demo set")
    o.add_argument("--lr", type=float, help="Adam learning rate of the context encoder; default: the preset's")
    o.add_argument("--discriminator-lr", type=float, help="Adam learning rate of the discriminator; default: lr/10")
    o.add_argument("--lr-schedule", choices=list(SCHEDULES), default="constant",
                   help="learning rate after the warm-up: constant (the paper's), or cosine decay to 0 at "
                        "--schedule-steps; applied to the discriminator's lr alike")
    o.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warm-up of the learning rate over the first N optimizer steps (from lr/N)")
    o.add_argument("--schedule-steps", type=int,
                   help="length of the schedule (cosine reaches 0 there); default: --max-steps. Set it when a run "
                        "is extended in stages with --resume and a larger --max-steps, so that each stage continues "
                        "the same schedule")
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
    d.add_argument("--data-cache", metavar="FILE.npy",
                   help="decode every image once into this memory-mapped file (built when missing or stale) and "
                        "cut crops and flips on the device: the fast path for GPUs")
    d.add_argument("--augment", choices=list(AUGMENTS), default="crop",
                   help="training crops: 'crop' = the original code's (shorter side resized to 1.13× the crop, a "
                        "random crop, a flip); 'rrc' = random-resized crops of that image (20–100 %% of its area, "
                        "aspect 3/4–4/3: MoCo v2's and MAE's lower bound of "
                        f"{RRC_SCALE[0]:g} rather than torchvision's 0.08, so the context around a hole stays a "
                        "scene rather than a texture) and a flip; 'rrc+jitter' adds a colour jitter (brightness, "
                        "contrast, saturation ±0.4, with probability 0.8). Same crops with --data-cache, cut on "
                        "the device")
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
    r.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: go on with a changed learning recipe (--lr, --loss, --augment, "
                        "--fc-dropout, masks' source...), which is otherwise refused; the change is recorded in "
                        "train_summary.json, the checkpoints and the model card")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run: its model, checkpoints, samples "
                        "and logs are deleted first (without this or --resume such a folder is refused)")
    r.add_argument("--max-time", metavar="DURATION",
                   help="wall-clock budget of this invocation (5400, 90m, 1h30m): at the end of the step that "
                        "exceeds it, save a checkpoint and the model and exit 0; --resume continues")
    r.add_argument("--push-to-hub", action="store_true", help="upload the final model to the Hugging Face Hub")
    r.add_argument("--hub-model-id", help="Hub repository, e.g. user/ce-alexnet (needed with --push-to-hub)")
    o.add_argument("--max-nonfinite-steps", type=int, default=20,
                   help="stop with an error after this many consecutive steps with a non-finite loss")
    o.add_argument("--check-finite-every", type=int,
                   help="read the device's count of skipped non-finite steps every N steps (a host sync); "
                        "default: --log-every")
    r.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW memory format (channels-last is faster on modern CPUs and GPUs)")
    o.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="run the model (and discriminator) under torch.compile(mode=MODE): "
                        f"{', '.join(COMPILE_MODES)}; the first steps compile (minutes); default: off")
    o.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step (forward, losses, backward, optimisers) as one CUDA graph "
                        "after 3 eager steps and replay it: one GPU, no gradient accumulation, bf16 or fp32")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Merge the preset with the flags and check everything that can be checked without building a model."""
    preset = dict(PRESETS[args.preset])
    pick = {k: getattr(args, k) for k in ("backbone", "image_size", "mask", "lr", "beta1", "adversarial_weight",
                                          "batch_size") if getattr(args, k) is not None}
    preset.update(pick)
    if args.image_size is None and args.backbone is not None and args.backbone != PRESETS[args.preset]["backbone"]:
        preset["image_size"] = default_image_size(args.backbone, PRESETS[args.preset]["image_size"])
        if args.preset == "inpainting":
            preset["pred_size"] = preset["image_size"] // 2
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
        preset=args.preset, data=args.data, data_split=args.data_split, streaming=args.streaming,
        data_cache=args.data_cache,
        mask_shapes=args.mask_shapes,
        mask_source=args.mask_source, loss=args.loss, high_pass_weight=args.high_pass_weight,
        discriminator_lr=args.discriminator_lr,
        augment=args.augment, decoder_norm=args.decoder_norm, encoder_init=args.encoder_init,
        fc_dropout=0.5 if args.fc_dropout is None else args.fc_dropout, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, schedule_steps=args.schedule_steps,
        weight_decay=args.weight_decay, gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or "no", output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        sample_every=args.sample_every, log_every=args.log_every, resume=args.resume, seed=args.seed,
        log_with=log_with, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
        num_workers=args.num_workers, channels_last=args.channels_last, max_nonfinite_steps=args.max_nonfinite_steps,
        check_finite_every=args.check_finite_every, compile=args.compile, cuda_graph=args.cuda_graph,
        cpu=args.cpu, overwrite=args.overwrite, allow_recipe_change=args.allow_recipe_change,
        max_time=None if args.max_time is None else parse_duration(args.max_time),
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
    if cfg.check_finite_every is not None:
        positive["check_finite_every"] = cfg.check_finite_every
    if cfg.schedule_steps is not None:
        positive["schedule_steps"] = cfg.schedule_steps
    positive["max_nonfinite_steps"] = cfg.max_nonfinite_steps
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    finite = dict(lr=cfg.lr, discriminator_lr=cfg.discriminator_lr, beta1=cfg.beta1, weight_decay=cfg.weight_decay,
                  fc_dropout=cfg.fc_dropout)
    for name, value in finite.items():
        if value is not None and not math.isfinite(value):  # nan passes every comparison below
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be ≥ 0, got {cfg.warmup_steps}")
    length = cfg.schedule_steps or cfg.max_steps
    if cfg.lr_schedule == "cosine" and cfg.warmup_steps >= length:
        raise ConfigError(f"--warmup-steps {cfg.warmup_steps} leaves no steps for the cosine decay: it must be below "
                          f"the schedule's length ({length}: --schedule-steps, else --max-steps)")
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.augment not in AUGMENTS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {cfg.augment!r}")
    if cfg.encoder_init not in ENCODER_INITS:
        raise ConfigError(f"--encoder-init must be one of {', '.join(ENCODER_INITS)}, got {cfg.encoder_init!r}")
    if cfg.decoder_norm not in DECODER_NORMS:
        raise ConfigError(f"--decoder-norm must be one of {', '.join(DECODER_NORMS)}, got {cfg.decoder_norm!r}")
    if not (cfg.high_pass_weight >= 0 and math.isfinite(cfg.high_pass_weight)):
        raise ConfigError(f"--high-pass-weight must be a finite number ≥ 0, got {cfg.high_pass_weight}")
    if not 0 <= cfg.fc_dropout < 1:
        raise ConfigError(f"--fc-dropout must be in [0, 1), got {cfg.fc_dropout}")
    if cfg.bottleneck != "channel-fc" and cfg.fc_dropout != 0.5:
        raise ConfigError(f"--fc-dropout applies to the channel-wise FC bottleneck of the features preset; the "
                          f"{cfg.preset} preset's {cfg.bottleneck!r} bottleneck has no dropout")
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
    try:
        check_trackers(cfg.log_with)
    except ValueError as err:
        raise ConfigError(f"--log-with {err}") from None
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("--push-to-hub needs --hub-model-id USER/NAME")
    if cfg.compile is not None and cfg.compile not in COMPILE_MODES:
        raise ConfigError(f"--compile {cfg.compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed precision {cfg.mixed_precision!r} is not one of no, fp16, bf16")
    if cfg.cuda_graph and cfg.compile is not None:
        raise ConfigError("--cuda-graph and --compile both capture the step; pass one of them (--compile "
                          "reduce-overhead graphs only the model)")
    if cfg.cuda_graph and cfg.gradient_accumulation_steps != 1:
        raise ConfigError("--cuda-graph captures one whole optimiser step; it cannot be combined with "
                          "--gradient-accumulation-steps")
    if cfg.cuda_graph and cfg.mixed_precision == "fp16":
        raise ConfigError("--cuda-graph does not support fp16 loss scaling; use --mixed-precision bf16 or no")
    if cfg.cuda_graph and (cfg.cpu or not _cuda_available()):
        raise ConfigError("--cuda-graph needs a CUDA GPU" + ("; it cannot be combined with --cpu" if cfg.cpu else
                                                             ", and none is available here"))
    if cfg.allow_recipe_change and not cfg.resume:
        raise ConfigError("--allow-recipe-change only applies when resuming: add --resume")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume {cfg.resume!r} is a file, not a checkpoint folder (OUTPUT_DIR/checkpoints/"
                          "step_N; --resume alone takes the latest)" if Path(cfg.resume).exists() else
                          f"--resume checkpoint {cfg.resume!r} does not exist")
    if cfg.streaming and (cfg.data is None or Path(cfg.data).is_dir() and not _is_saved_dataset(cfg.data)):
        raise ConfigError("--streaming applies to Hugging Face datasets, not to image folders or the demo set")
    if cfg.data_cache and cfg.streaming:
        raise ConfigError("--data-cache needs the whole dataset; it cannot be combined with --streaming")
    if cfg.adversarial and cfg.mask == "none":
        raise ConfigError("the autoencoder baseline (--mask none) has no hole for the adversarial loss to judge")


def _trackers() -> set[str]:
    """accelerate's tracker names (``--log-with``; ``csv`` is ce-pretrain's own)."""
    from accelerate.utils import LoggerType

    return {t.value for t in LoggerType} - {"all"}


def check_trackers(names) -> None:
    """Refuse a ``--log-with`` name that is neither ``csv`` nor one of accelerate's trackers.

    Raises:
        ValueError: naming the first unknown tracker and the known ones.
    """
    unknown = [t for t in names if t != "csv" and t not in _trackers()]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a tracker: csv, {', '.join(sorted(_trackers()))} or none")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_saved_dataset(path: str) -> bool:
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "dataset_dict.json"))


def default_image_size(backbone: str, fallback: int) -> int:
    """The side a backbone was designed for: timm's ``pretrained_cfg['input_size']``, else ``fallback``."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone.split(".", 1)[0]) if "/" not in backbone else None
    size = getattr(cfg, "input_size", None)
    return int(size[-1]) if size else fallback


def check_backbone_size(backbone: str, image_size: int, batch_size: int, backbone_kwargs: dict | None = None,
                        memory_bytes: int | None = None) -> None:
    """Refuse an ``image_size`` that ``backbone`` cannot take, or whose activations cannot fit in memory.

    The encoder is built on the ``meta`` device (no weights allocated, about a second) and run once, so a size
    below the backbone's minimum (AlexNet's pool5 at 64 px), a fixed-size model (a ViT at anything but its own
    size) and an absurd size (5000 px) fail here in one line instead of deep inside torch after the data is read.

    Raises:
        ConfigError: naming the backbone, the size and what would work.
    """
    import torch

    from .model import Encoder

    name = backbone.split(".", 1)[0]
    flag = f"--image-size {image_size}"
    with torch.device("meta"):
        encoder = Encoder(backbone, **(backbone_kwargs or {}))
    native = (encoder.model.pretrained_cfg or {}).get("input_size")
    if (encoder.model.pretrained_cfg or {}).get("fixed_input_size") and native and native[-1] != image_size:
        raise ConfigError(f"{flag}: {name} takes {native[-1]}×{native[-1]} images only; drop --image-size to use "
                          f"{native[-1]}, or choose a backbone that takes any size")
    activations = 0

    def count(_module, _inputs, output) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor):
            activations += output.numel()

    # outputs of the layers with weights (convolutions, norms, linears): what the backward pass keeps
    weighted = [m for m in encoder.modules() if next(m.parameters(recurse=False), None) is not None]
    hooks = [m.register_forward_hook(count) for m in weighted]
    try:
        with torch.device("meta"):
            encoder(torch.empty(1, 3, image_size, image_size))
    except Exception as e:  # timm and torch raise assorted types for inputs a model cannot take
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        own = f" (its own is {native[-1]})" if native else ""
        raise ConfigError(f"{flag} is too small for {name} ({reason}); use a larger one{own}") from None
    finally:
        for hook in hooks:
            hook.remove()
    # in fp32; the decoder, gradients and optimiser come on top, so this is a lower bound
    need = activations * 4 * batch_size
    have = memory_bytes if memory_bytes is not None else _device_memory()
    if have and need > have:
        raise ConfigError(f"{flag} with --batch-size {batch_size}: {name}'s activations alone need about "
                          f"{need / 2**30:,.0f} GiB, more than the {have / 2**30:,.0f} GiB of this device; "
                          "lower --image-size or --batch-size")


def _device_memory() -> int | None:
    """Bytes of the first GPU, else of the machine's RAM (``None`` when neither can be read)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
