"""ImageFolder classification: the quickest honest answer to "did my pretraining help?".

    python -m transfer.imagefolder --model SRC --train DIR --val DIR --mode finetune|linear|knn --output-dir D
    python -m transfer.imagefolder --model SRC --train DIR --holdout 0.2 --mode knn --output-dir D

``DIR`` holds one sub-folder of images per class. ``SRC`` is anything ``transfer.common.load_encoder`` takes: a
``ContextEncoder.save_pretrained`` folder, a timm encoder folder, a Hub id, or ``random:<timm name>``.

* ``knn``: the frozen encoder's every stage, pooled to about 9K values and standardised; k = 20 cosine neighbours
  vote ``exp(sim / 0.07)``.
* ``linear``: the same features, one multinomial logistic regression per stage; its weight decay is chosen on a
  split of the training set (``--selection-fraction``), then it is refitted on the whole training set.
* ``finetune``: the whole encoder plus a fresh classifier, random-resized crops and flips, centre-crop test.

The probes report every stage and, at the top level, the stage that scored best on the training-set split (the
validation images never choose anything). ``results.json`` holds top-1, top-5 and per-class accuracy.

Stopping: fine-tuning checkpoints like every transfer run (``--checkpoint-every``, ``--resume``). The probes save
each finished stage to ``probe-stages.json``; SIGINT / SIGTERM stop them after the current stage (or batch of
feature extraction) with status 130 / 143, ``--max-time`` after the stage that spends it (status 0, ``results.json``
says ``"complete": false``), and ``--resume`` fits only the stages still missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ce_pretrain.atomic import write_text_atomic
from ce_pretrain.config import ConfigError, check_backbone_size
from ce_pretrain.data import ImageReadError
from ce_pretrain.host_memory import retain_freed_memory
from ce_pretrain.rescale import rescale_
from ce_pretrain.stopping import StopRequest, describe
from transfer.common.checkpoint import EncoderCheckpoint, check_source, load_encoder
from transfer.common.cli import (
    OneLineParser,
    RunFlags,
    RunInterrupted,
    UsageError,
    add_common_args,
    check_output_dir,
    check_positive,
    claim_output_dir,
    declared_defaults,
    run_main,
)
from transfer.common.engine import MODEL_DIR

from .data import (
    ImageFolderError,
    LabelledImages,
    check_classes,
    eval_transform,
    per_class_subset,
    readable,
    scan,
    stratified_split,
)
from .probes import (
    WEIGHT_DECAYS,
    StageFeatures,
    channel_health,
    classification_metrics,
    extract,
    fit_linear,
    knn_scores,
    select_weight_decay,
    standardise,
)

__all__ = ["ImageFolderConfig", "main", "run"]

MODES = ("finetune", "linear", "knn")
PROBE_STATE = "probe-stages.json"  # the stages a probe has finished, for --resume
# flags that do not change a probe's numbers: a run resumed with other values of these still matches
_RUN_ONLY = ("output_dir", "resume", "overwrite", "num_workers", "max_time", "log_with", "checkpoint_every",
             "epochs", "max_steps", "lr", "weight_decay", "save_model")
KNN_FEATURES = ("standardised", "raw")
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ImageFolderConfig(RunFlags):
    """Flags of the entry point (see ``--help``)."""

    model: str
    train: str
    mode: str = "knn"
    val: str | None = None
    holdout: float | None = None
    labels_per_class: int | None = None
    output_dir: str = "runs/imagefolder"
    image_size: int | None = None
    batch_size: int = 64
    cpu: bool = False
    k: int = 20
    temperature: float = 0.07
    selection_fraction: float = 0.2
    weight_decays: list[float] = field(default_factory=lambda: list(WEIGHT_DECAYS))
    rescale: bool = False
    rescale_beta: float | None = None
    rescale_images: int = 64
    epochs: int = 30
    max_steps: int | None = None
    lr: float = 3e-4
    weight_decay: float = 0.05
    save_model: bool = False
    knn_features: str = "standardised"


def _splits(cfg: ImageFolderConfig) -> tuple[list, list, list[str], list[str]]:
    """``(train, val, classes, skipped)``: the samples of each split, and the files skipped as unreadable."""
    train, classes = scan(cfg.train)
    train, skipped = readable(train)
    if cfg.holdout is not None:
        train, val = stratified_split(train, cfg.holdout, cfg.seed)
    else:
        val, _ = scan(cfg.val, classes)
        val, bad = readable(val)
        skipped += bad
    check_classes(train, classes, cfg.train)
    if cfg.labels_per_class is not None:  # after the hold-out: the validation images stay the same for every n
        train = per_class_subset(train, cfg.labels_per_class, cfg.seed)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), listed in results.json; the first: {skipped[0]}",
              file=sys.stderr)
    return train, val, classes, skipped


def _device(cfg: ImageFolderConfig) -> torch.device:
    if cfg.cpu or not torch.cuda.is_available():
        retain_freed_memory()  # feature extraction otherwise page-faults its large activations in every batch
        return torch.device("cpu")
    return torch.device("cuda")


def _loader(dataset: LabelledImages, cfg: ImageFolderConfig, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle,
                                       num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())


def calibration_batch(samples: list, ckpt: EncoderCheckpoint, size: int, n: int, seed: int) -> torch.Tensor:
    """``n`` training images (a seeded draw), centre-cropped and normalised: the batch :func:`rescale_` sees."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n]
    data = LabelledImages([samples[i] for i in order], eval_transform(size, ckpt.mean, ckpt.std))
    return torch.stack([data[i][0] for i in range(len(data))])


def build_encoder(ckpt: EncoderCheckpoint, cfg: ImageFolderConfig, train: list, size: int, device: torch.device,
                  num_classes: int = 0) -> tuple[torch.nn.Module, dict | None]:
    """The timm model of ``ckpt`` on ``device``, data-dependently rescaled when ``--rescale`` asks."""
    model = ckpt.create_model(num_classes=num_classes).to(device)
    if not cfg.rescale:
        return model, None
    images = calibration_batch(train, ckpt, size, cfg.rescale_images, cfg.seed).to(device)
    report = rescale_(model, images, beta=cfg.rescale_beta, seed=cfg.seed)
    return model, asdict(report)


def _probe_settings(cfg: ImageFolderConfig) -> dict:
    """What decides a probe's numbers (every flag but :data:`_RUN_ONLY`), as JSON values."""
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg), default=str)).items() if k not in _RUN_ONLY}


def _finished_stages(cfg: ImageFolderConfig, out: Path) -> dict:
    """The stages an earlier run of the same probe in ``out`` finished, when ``--resume`` asks for them.

    Raises:
        UsageError: ``probe-stages.json`` is unreadable, or was written with other settings.
    """
    path = out / PROBE_STATE
    if cfg.resume is None or not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        saved, stages = state["settings"], state["stages"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume: cannot read {str(path)!r} ({err}); pass --overwrite to start afresh") from None
    now = _probe_settings(cfg)
    defaults = declared_defaults(cfg)  # a setting added since the file was written: what that run did
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))
    if changed:
        raise UsageError(f"--resume: {str(path)!r} was written with other settings ({', '.join(changed)}); pass "
                         "--overwrite to start afresh")
    return stages


class _Stopped(Exception):
    """A stop was asked for during feature extraction."""


def _until_stopped(loader, stop: StopRequest):
    """``loader``'s batches, raising :class:`_Stopped` at the first batch after a stop was asked for."""
    for batch in loader:
        if stop.code():
            raise _Stopped
        yield batch


def _probe(cfg: ImageFolderConfig, ckpt: EncoderCheckpoint, train: list, val: list, classes: list[str],
           size: int, device: torch.device, out: Path, stop: StopRequest) -> dict:
    model, rescale_report = build_encoder(ckpt, cfg, train, size, device)
    stages = StageFeatures(model.cpu(), size)
    done = _finished_stages(cfg, out)
    unknown = sorted(set(done) - set(stages.names))
    if unknown:
        raise UsageError(f"--resume: {str(out / PROBE_STATE)!r} names stages this encoder lacks ({', '.join(unknown)})")
    todo = [(n, c) for n, c in zip(stages.names, stages.channels) if n not in done]
    per_stage = dict(done)
    if done:
        print(f"resuming: {len(done)} of {len(stages.names)} stages done ({out / PROBE_STATE})", flush=True)

    def save() -> None:
        state = {"settings": _probe_settings(cfg), "stages": per_stage}
        write_text_atomic(out / PROBE_STATE, json.dumps(state, indent=2) + "\n")

    def stopped(code: int) -> dict:
        if code > 1:
            raise RunInterrupted(f"stopped by {describe(code)} after {len(per_stage)}/{len(stages.names)} stages "
                                 f"({out / PROBE_STATE}); to continue, rerun the same command with --resume", code)
        return {"complete": False, "top1": None, "stages": per_stage, "rescale": rescale_report}

    if todo:
        tf = eval_transform(size, ckpt.mean, ckpt.std)
        dtype = PRECISIONS[cfg.mixed_precision or "no"] if device.type == "cuda" else None
        try:
            train_feats, train_y = extract(stages, _until_stopped(_loader(LabelledImages(train, tf), cfg), stop),
                                           device, dtype)
            val_feats, val_y = extract(stages, _until_stopped(_loader(LabelledImages(val, tf), cfg), stop),
                                       device, dtype)
        except _Stopped:
            return stopped(stop.code())
        # the split of the training set that chooses the weight decay (linear) and the reported stage (both modes)
        fit_idx, held_idx = (torch.tensor(ix) for ix in _index_split(train_y, cfg.selection_fraction, cfg.seed))
    for name, channels in todo:
        x_tr, y_tr = train_feats[name].to(device), train_y.to(device)
        x_fit, x_held, x_val = x_tr[fit_idx], x_tr[held_idx], val_feats[name].to(device)
        if cfg.mode == "linear" or cfg.knn_features == "standardised":
            x_fit, x_held = standardise(x_fit, x_held)
            x_tr, x_val = standardise(x_tr, x_val)
        if cfg.mode == "knn":
            held_scores = knn_scores(x_fit, y_tr[fit_idx], x_held, len(classes), cfg.k, cfg.temperature)
            selection = {"held_out_top1": float((held_scores.argmax(1) == y_tr[held_idx]).float().mean()) * 100}
            scores = knn_scores(x_tr, y_tr, x_val, len(classes), cfg.k, cfg.temperature)
        else:
            wd, acc = select_weight_decay(x_fit, y_tr[fit_idx], x_held, y_tr[held_idx], len(classes),
                                          cfg.weight_decays)
            selection = {"weight_decay": wd, "held_out_top1": acc[wd],
                         "held_out_top1_by_weight_decay": {str(k): v for k, v in acc.items()}}
            scores = fit_linear(x_tr, y_tr, len(classes), wd)(x_val)
        per_stage[name] = {**classification_metrics(scores, val_y, classes), "selection": selection,
                           "features": int(x_tr.shape[1]),
                           "health": channel_health(train_feats[name], channels)}
        save()
        if stop.code() and len(per_stage) < len(stages.names):
            return stopped(stop.code())
    per_stage = {n: per_stage[n] for n in stages.names}  # the encoder's order, whatever order they finished in
    best = max(stages.names, key=lambda n: per_stage[n]["selection"]["held_out_top1"])
    return {**{k: per_stage[best][k] for k in ("top1", "top5", "mean_per_class", "per_class")}, "stage": best,
            "stages": per_stage, "rescale": rescale_report}


def _index_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    fit, held = stratified_split([(i, int(y)) for i, y in enumerate(labels)], fraction, seed)
    if not held or not fit:
        raise ImageFolderError("too few training images to hold a split out for model selection")
    return [i for i, _ in fit], [i for i, _ in held]


def run(cfg: ImageFolderConfig) -> dict:
    """Train / fit and evaluate; returns what ``results.json`` holds (accuracies in percent)."""
    if cfg.mode not in MODES:
        raise ImageFolderError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if (cfg.val is None) == (cfg.holdout is None):
        raise ImageFolderError("give exactly one of --val DIR and --holdout FRACTION")
    if cfg.knn_features not in KNN_FEATURES:
        raise ImageFolderError(f"--knn-features must be one of {', '.join(KNN_FEATURES)}, got {cfg.knn_features!r}")
    if cfg.knn_features != "standardised" and cfg.mode != "knn":
        raise ImageFolderError(f"--knn-features is the kNN's; --mode {cfg.mode} does not use it")
    if cfg.save_model and cfg.mode != "finetune":
        raise ImageFolderError(f"--save-model keeps a fine-tuned model; --mode {cfg.mode} trains none (its "
                               "per-stage scores are in results.json)")
    check_positive(batch_size=cfg.batch_size, k=cfg.k, rescale_images=cfg.rescale_images, epochs=cfg.epochs,
                   max_steps=cfg.max_steps, image_size=cfg.image_size, labels_per_class=cfg.labels_per_class)
    check_source(cfg.model)  # a missing or half-written model fails before any data is read or folder made
    markers = ("results.json", "checkpoints", PROBE_STATE, MODEL_DIR)
    out = check_output_dir(cfg.output_dir, resume=cfg.resume is not None, overwrite=cfg.overwrite, markers=markers)
    # fine-tuning claims the folder in the engine's fit(); the probes hold it here
    claim = contextlib.nullcontext(out) if cfg.mode == "finetune" else claim_output_dir(
        out, resume=cfg.resume is not None, overwrite=cfg.overwrite, markers=markers)
    with claim:
        return _run(cfg, out)


def _run(cfg: ImageFolderConfig, out: Path) -> dict:
    torch.manual_seed(cfg.seed)
    start, began = time.time(), time.monotonic()
    train, val, classes, skipped = _splits(cfg)  # before the encoder loads: bad folders fail in a second
    ckpt = load_encoder(cfg.model, cfg.image_size, cfg.seed)
    size = cfg.image_size or ckpt.image_size
    try:  # a size the backbone cannot take (a ViT at another size, AlexNet below 63 px) fails here in one line
        check_backbone_size(ckpt.backbone, size, cfg.batch_size, ckpt.backbone_kwargs)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    device = _device(cfg)
    if cfg.mode == "finetune":
        from .finetune import finetune

        result = finetune(cfg, ckpt, train, val, classes, size, device)
    else:
        with StopRequest(cfg.max_time, began) as stop:
            result = _probe(cfg, ckpt, train, val, classes, size, device, out, stop)
    result = {"task": "imagefolder", "mode": cfg.mode, "model": cfg.model, "backbone": ckpt.backbone,
              "image_size": size, "classes": classes, "train_images": len(train), "val_images": len(val),
              "skipped_files": skipped,
              "complete": True, **result, "device": result.get("device", str(device)), "torch": torch.__version__,
              "seconds": time.time() - start, "config": json.loads(json.dumps(asdict(cfg), default=str))}
    write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m transfer.imagefolder", description=__doc__.split("\n\n")[0])
    add_common_args(p, output_dir=ImageFolderConfig.output_dir)
    p.add_argument("--train", required=True, metavar="DIR", help="training images, one sub-folder per class")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--val", metavar="DIR", help="validation images, the same class sub-folders")
    data.add_argument("--holdout", type=float, metavar="FRACTION",
                      help="validate on this fraction of every class of --train instead")
    p.add_argument("--labels-per-class", type=int, metavar="N",
                   help="use only N labelled training images of each class (a draw fixed by --seed; after "
                        "--holdout): the few-label regime, where better starting weights should matter most")
    p.add_argument("--mode", choices=MODES, default="knn")
    p.add_argument("--image-size", type=int, help="crop side (default: the pretraining size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    probe = p.add_argument_group("knn / linear")
    probe.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    probe.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)")
    probe.add_argument("--knn-features", choices=KNN_FEATURES, default="standardised",
                       help="kNN on features standardised with training statistics (default), or on the raw "
                            "pooled features as InstDisc / DINO (2.3-4 points lower on the study's split)")
    probe.add_argument("--selection-fraction", type=float, default=0.2,
                       help="fraction of every training class held out to choose the weight decay and the stage")
    probe.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS),
                       help="linear: the candidates")
    resc = p.add_argument_group("rescaling (Krähenbühl et al., ICLR 2016)")
    resc.add_argument("--rescale", action="store_true",
                      help="rescale the encoder's layers from a batch of training images before transfer")
    resc.add_argument("--rescale-beta", type=float,
                      help="set every unit's mean to this (an initialisation, e.g. of Gaussian weights); default: "
                           "keep each unit's mean/std ratio")
    resc.add_argument("--rescale-images", type=int, default=64, help="calibration batch size")
    ft = p.add_argument_group("finetune")
    ft.add_argument("--epochs", type=int, default=30)
    ft.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    ft.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (one-cycle schedule)")
    ft.add_argument("--weight-decay", type=float, default=0.05)
    ft.add_argument("--checkpoint-every", type=int, default=1000, help="steps between resumable checkpoints")
    ft.add_argument("--save-model", action="store_true",
                    help="keep the fine-tuned classifier in OUTPUT_DIR/model/, a timm folder: "
                         "timm.create_model('local-dir:OUTPUT_DIR/model', pretrained=True)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit status (2 for bad input, 130 / 143 when interrupted)."""

    def report(args: argparse.Namespace) -> None:
        result = run(ImageFolderConfig(**vars(args)))
        if result.get("top1") is not None:  # None: --max-time stopped fine-tuning before the evaluation
            where = f" (stage {result['stage']})" if "stage" in result else ""
            print(f"{result['mode']} {result['backbone']}: top-1 {result['top1']:.1f} %, top-5 {result['top5']:.1f} %"
                  f"{where} on {result['val_images']} images, {len(result['classes'])} classes; "
                  f"{args.output_dir}/results.json")

    return run_main(build_parser(), report, argv, errors=(ImageFolderError, ImageReadError))
