"""Hugging Face model cards for context-encoder checkpoints.

``write_model_card(out_dir, model, training=..., evaluation=...)`` writes ``out_dir/README.md``: YAML front matter
(library name, tags, license, datasets, metrics, pipeline tag) and the sections of a Hugging Face card (details,
intended uses, training data and procedure, evaluation, limitations, how to load), filled from the model's
configuration, the training run's flags and statistics, and the Table 1 numbers of ``ce-pretrain evaluate`` when
known. The template is :data:`TEMPLATE`, read from ``ce_pretrain/model_card_template.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from string import Template

from huggingface_hub import ModelCardData

from .atomic import write_text_atomic

__all__ = ["TEMPLATE", "render_model_card", "write_model_card"]

PAPER_URL = "https://arxiv.org/abs/1604.07379"
TAGS = ["context-encoder", "self-supervised", "inpainting", "image-feature-extraction", "timm",
        "model_hub_mixin", "pytorch_model_hub_mixin"]
# Hugging Face `evaluate` metric ids of the Table 1 columns: mean L1 (MAE), mean L2 (MSE), PSNR
METRICS = ["mae", "mse", "psnr"]
# keys under which a training run may name its data (the training script's flags, or a caller's own dict)
DATA_KEYS = ("datasets", "dataset", "data", "hf_dataset", "train_data")

# the Hugging Face card with `$placeholders`; shipped inside the package, edited in this one file
TEMPLATE = (resources.files(__package__) / "model_card_template.md").read_text(encoding="utf-8")


def _hub_dataset_id(value: object) -> str | None:
    """``value`` if it looks like a Hugging Face dataset id (``name`` or ``owner/name``) and not a local path."""
    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")) or os.path.exists(value):
        return None
    return value if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) else None


def _datasets(training: dict | None) -> tuple[list[str], list[str]]:
    """(Hub dataset ids for the front matter, every data source named by the run)."""
    named: list[str] = []
    for key in DATA_KEYS:
        value = (training or {}).get(key)
        named += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] if value else []
    hub = [d for d in (_hub_dataset_id(v) for v in named) if d]
    return list(dict.fromkeys(hub)), list(dict.fromkeys(named))


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _details(config: dict, num_parameters: int | None) -> str:
    backbone, size = config.get("backbone", "alexnet"), config.get("image_size", 227)
    pred = config.get("pred_size") or size
    bottleneck = config.get("bottleneck", "channel-fc")
    neck = ("channel-wise fully-connected layer (§3.1) with dropout "
            f"{config.get('dropout', 0.5)} and a 1×1 convolution" if bottleneck == "channel-fc"
            else f"{config.get('bottleneck_dim', 4000)}-unit fully-connected bottleneck (§5.1)")
    output = (f"the central {pred}×{pred} px, overlapping the context by {config.get('overlap', 0)} px"
              if pred < size else f"the whole {size}×{size} px image (only the hole is used)")
    lines = [
        f"- **Encoder**: timm `{backbone}`"
        + (", initialised from timm's pretrained weights" if config.get("pretrained_backbone") else ", from scratch"),
        f"- **Bottleneck**: {neck}",
        "- **Decoder**: up-convolutions (transposed convolutions with ReLU) to the prediction size",
        f"- **Input**: {size}×{size} RGB in [0, 1], normalised inside the model with mean "
        f"{_format_value(list(config.get('mean', [])))} and std {_format_value(list(config.get('std', [])))}; "
        "dropped pixels are set to the mean",
        f"- **Output**: {output}",
        f"- **Parameters**: {num_parameters:,}" if num_parameters else "",
        "- **Library**: ce-pretrain; **license**: MIT",
        f"- **Configuration**: `{json.dumps(config, default=str)}`",
    ]
    return "\n".join(line for line in lines if line)


def _training_data(training: dict | None) -> str:
    _, named = _datasets(training)
    if not named:
        return "Not recorded with this checkpoint. The objective needs images only, no labels."
    return "Images from " + ", ".join(f"`{n}`" for n in named) + "; no labels are used (self-supervised)."


def _training_procedure(training: dict | None) -> str:
    text = ("Masked reconstruction (§3): regions covering up to a quarter of each image are dropped (central "
            "square, random blocks or random regions) and filled with the dataset mean; the network predicts them "
            "under a masked, normalised L2 loss (optionally with the joint adversarial loss of §3.2).")
    if not training:
        return text + "\n\nThe training run's settings were not recorded with this checkpoint."
    rows = [f"| {key} | {_format_value(value)} |" for key, value in training.items()]
    return text + "\n\n| setting | value |\n|---|---|\n" + "\n".join(rows)


def _metric(value: object, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "∞" if not percent else "—"
    return f"{float(value):.2f}" + (" %" if percent else "")


def _evaluation(evaluation: dict | None) -> str:
    if not evaluation:
        return ("Not evaluated yet. `ce-pretrain evaluate --model <this model> --data <held-out images> --pool "
                "<other images> --json eval.json` measures the paper's Table 1 (mean L1 and L2 error over the hole, "
                "PSNR) with the mean-fill and nearest-neighbour baselines; pass the JSON to `ce-pretrain card`.")
    rows = evaluation.get("metrics", evaluation)
    if "l1" in rows:  # a single row of numbers
        rows = {"context encoder": rows}
    lines = ["| method | mean L1 error | mean L2 error | PSNR (dB) |", "|---|---|---|---|"]
    for name, vals in rows.items():
        if isinstance(vals, dict):
            lines.append(f"| {name} | {_metric(vals.get('l1'), True)} | {_metric(vals.get('l2'), True)} | "
                         f"{_metric(vals.get('psnr'), False)} |")
    setting = []
    if "num_images" in evaluation:
        setting.append(f"{evaluation['num_images']} held-out images")
    if evaluation.get("num_pool"):
        setting.append(f"a neighbour pool of {evaluation['num_pool']} other images")
    if "mask" in evaluation:
        setting.append(f"`{evaluation['mask']}` masks")
    if "image_size" in evaluation:
        setting.append(f"at {evaluation['image_size']}×{evaluation['image_size']} px")
    if evaluation.get("data"):
        setting.append(f"data `{evaluation['data']}`")
    intro = ("The protocol of the paper's Table 1: errors over the hole only, in % of the pixel range, and PSNR; "
             "the baselines ran on the same images and masks" + (f" ({', '.join(setting)})." if setting else "."))
    return intro + "\n\n" + "\n".join(lines)


def _front_matter(config: dict, training: dict | None) -> str:
    hub_datasets, _ = _datasets(training)
    backbone = str(config.get("backbone", "alexnet"))
    base_model = None
    if config.get("pretrained_backbone"):
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone)
        base_model = getattr(cfg, "hf_hub_id", None) or None
    data = ModelCardData(
        library_name="ce-pretrain", license="mit", tags=TAGS + [backbone.split(".", 1)[0]],
        datasets=hub_datasets or None, metrics=METRICS, pipeline_tag="image-feature-extraction",
        base_model=base_model,
    )
    yaml = data.to_yaml()
    if base_model is None:
        # a literal `base_model: none` would be read by the Hub as a link to a model called "none"
        yaml += "\n# base_model: none (trained from scratch)"
    return yaml


def render_model_card(
    config: dict,
    training: dict | None = None,
    evaluation: dict | None = None,
    model_id: str | None = None,
    num_parameters: int | None = None,
) -> str:
    """The card's Markdown text.

    Args:
        config: the model's configuration (``config.json`` as written by ``save_pretrained``).
        training: the training run's flags and statistics (any JSON-like values), ``None`` if unknown.
        evaluation: Table 1 numbers, as :meth:`ce_pretrain.evaluate.Evaluation.to_dict` returns them (or just
            ``{method: {"l1", "l2", "psnr"}}``), ``None`` if not evaluated.
        model_id: the repository or folder name used in the loading examples.
        num_parameters: shown under model details when given.
    """
    backbone = str(config.get("backbone", "alexnet"))
    title = f"Context encoder ({backbone}, {config.get('image_size', 227)} px)"
    return Template(TEMPLATE).substitute(
        front_matter=_front_matter(config, training), title=title, paper_url=PAPER_URL,
        details=_details(config, num_parameters), training_data=_training_data(training),
        training_procedure=_training_procedure(training), evaluation=_evaluation(evaluation),
        image_size=config.get("image_size", 227), model_id=model_id or "<user>/<this-repo>",
    )


def write_model_card(directory: str | os.PathLike, model, training: dict | None = None,
                     evaluation: dict | None = None) -> Path:
    """Write ``directory/README.md``, the filled card of ``model`` (atomically; an existing card is replaced).

    Args:
        directory: the model folder (usually the one just written by ``model.save_pretrained``).
        model: a :class:`~ce_pretrain.ContextEncoder`.
        training: the training run's flags and statistics.
        evaluation: Table 1 numbers (see :func:`render_model_card`).

    Returns:
        The path of the card.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(getattr(model, "config", None) or {})
    text = render_model_card(config, training, evaluation, model_id=out.name,
                             num_parameters=sum(p.numel() for p in model.parameters()))
    return write_text_atomic(out / "README.md", text)
