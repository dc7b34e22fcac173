"""Hugging Face model cards for context-encoder checkpoints.

``write_model_card(out_dir, model, training=..., evaluation=...)`` writes ``out_dir/README.md``: YAML front matter
(library name, tags, license, datasets, metrics, pipeline tag) and the sections of a Hugging Face card (details,
intended uses, training data and procedure, evaluation, limitations, how to load), filled from the model's
configuration, the training run's flags and statistics, and the Table 1 numbers of ``ce-pretrain evaluate`` when
known. The template is :data:`TEMPLATE`; ``model_cards/TEMPLATE.md`` in the repository is a copy kept identical by
the tests, so it can be read and edited there.
"""

from __future__ import annotations

import json
import math
import os
import re
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

TEMPLATE = """---
$front_matter
---

# $title

A **context encoder** (Pathak et al., *Context Encoders: Feature Learning by Inpainting*, CVPR 2016,
[arXiv:1604.07379]($paper_url)): a convolutional network trained to fill in a region dropped from an image, given
only its surroundings. Doing so well needs an understanding of the whole image, so the encoder learns features
that transfer to classification, detection and segmentation. Trained with ce-pretrain, which packages the
objective as a pretraining head over any [timm](https://github.com/huggingface/pytorch-image-models) backbone.

## Model details

$details

## Intended uses

- **Pretraining**: take the encoder (exported in timm's own layout with `ce_pretrain.export.save_timm_encoder`)
  as the initialisation of a classifier, detector or segmenter and fine-tune it, re-initialising the
  fully-connected layers (§5.2 of the paper).
- **Inpainting**: fill a hole in a photograph from its context (`ce-pretrain inpaint`), best at the
  kind of images and the mask shapes it was trained on.
- **Feature analysis**: nearest neighbours of a hole from its context (`ce-pretrain neighbors`, the paper's Fig. 8).
- **Demo**: `ce-pretrain demo --model $model_id` serves a web page that inpaints your images (also as a Space).

Out of scope: restoring or inventing content that others will take as real (faces, documents, evidence); the
predicted pixels are a plausible guess, not a recovery.

## Training data

$training_data

## Training procedure

$training_procedure

## Evaluation

$evaluation

## Limitations

- With the reconstruction (L2) loss alone the predicted pixels are blurry: the loss rewards the mean of the
  plausible fills (§3.2). The adversarial term sharpens them at the cost of coherence.
- The model sees images at $image_size×$image_size px; `ce-pretrain inpaint` resizes any image to that size and
  pastes the filled hole back at full resolution, so large images get a soft fill.
- The hole is filled with the dataset mean before encoding; holes much larger than those seen in training
  (at most a quarter of the image) or of another kind (centre square, random blocks, random regions) fill worse.
- Features reflect the training images: a model pretrained on a small or narrow set transfers less well, and
  inherits that set's biases.

## How to load

```python
from ce_pretrain import ContextEncoder

model = ContextEncoder.from_pretrained("$model_id")  # a Hub repository or a local folder; loads strictly
# images [B, 3, $image_size, $image_size] in [0, 1]; mask bool [B, 1, $image_size, $image_size], True = dropped
pred = model(images, mask)  # the predicted pixels, in [0, 1]
```

The encoder alone, as a timm model (after `ce_pretrain.export.save_timm_encoder(model, "encoder/")`):

```python
import timm, ce_pretrain  # ce_pretrain registers the paper's encoders (alexnet, dcgan_encoder) in timm

encoder = timm.create_model("local-dir:encoder/", pretrained=True)  # or "hf-hub:<repo>" once pushed
```

From the command line:

```bash
ce-pretrain inpaint --model $model_id photo.jpg --out filled/
ce-pretrain evaluate --model $model_id --data held_out/ --pool other_images/ --json eval.json
```

## Citation

```bibtex
@inproceedings{pathak2016context,
  title     = {Context Encoders: Feature Learning by Inpainting},
  author    = {Pathak, Deepak and Kr{\\"a}henb{\\"u}hl, Philipp and Donahue, Jeff and Darrell, Trevor
               and Efros, Alexei A.},
  booktitle = {Computer Vision and Pattern Recognition (CVPR)},
  year      = {2016}
}
```
"""


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
