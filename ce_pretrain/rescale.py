"""Data-dependent rescaling of an encoder (Krähenbühl, Doersch, Donahue & Darrell, ICLR 2016).

Krähenbühl et al. set the scale of every convolution and fully-connected layer from a batch of real images instead
of from a fixed Gaussian width, in two steps:

* **within-layer** (their §3.1): each output channel of each layer, taken in forward order, is divided by its
  standard deviation over the batch and the spatial positions, so every unit has unit variance on real data and no
  unit dominates the next layer. Their initialisation also moves each unit's mean to a constant β (``beta``);
  without ``beta`` the bias is only divided along with the weights, which keeps each filter's direction and the
  sign pattern of its output.
* **between-layer** (their §3.2): the layers should learn at the same speed. With random Gaussian gradients at the
  output, the rate of change of layer k is ``r_k = sqrt(mean(dL/dW_k²) / mean(W_k²))``; each layer's weights are
  multiplied by ``sqrt(r_k / r̄)`` (r̄ the geometric mean, nudged so the output std goes to 1) and biases follow the
  scale of the layer's input, repeated until the ratios agree. In a network of ReLUs and max-pools without
  normalisation layers (AlexNet, VGG) this changes the function only by one overall factor.

Pathak et al. (§5.2) tried this rescaling on context-encoder features and saw no gain; it is offered here so that
users can check that for their own encoders, and it turns the paper's "random Gaussian" baseline into a usable
initialisation. Layers followed by BatchNorm are rescaled too, but BatchNorm undoes most of it.

    rescale_(model, images)            # the one-line hook for any transfer entry point

Pretraining can start from a rescaled encoder too (``train.py --encoder-init rescale``,
:func:`rescale_encoder_`), so that a context encoder starts where the rescaled random baseline starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["RescaleReport", "gaussian_init_", "rescale_", "rescale_encoder_", "rescaled_layers"]

_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class RescaleReport:
    """What :func:`rescale_` did.

    Attributes:
        layers: names of the rescaled layers in forward order.
        output_std: mean per-channel std of each layer's output on the calibration batch, after rescaling.
        rate_ratios: ``r_k`` per layer after the last between-layer iteration (empty when that step is off).
        iterations: between-layer iterations run.
    """

    layers: list[str] = field(default_factory=list)
    output_std: dict[str, float] = field(default_factory=dict)
    rate_ratios: dict[str, float] = field(default_factory=dict)
    iterations: int = 0


def _default_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # The transferred part is the trunk (the paper's "encoder up to pool5"), not timm's fresh pre-logits.
    return model.forward_features if hasattr(model, "forward_features") else model


def rescaled_layers(model: nn.Module, images: torch.Tensor,
                    forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[tuple[str, nn.Module]]:
    """The convolution and linear layers that ``forward`` runs on ``images``, in the order they run."""
    forward = forward or _default_forward(model)
    names = {m: n for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: order.append(mod) if mod not in order else None)
             for m in names]
    try:
        with torch.no_grad():
            forward(images)
    finally:
        for h in hooks:
            h.remove()
    return [(names[m], m) for m in order]


def _channel_stats(y: torch.Tensor, channel_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``y`` over every axis but ``channel_dim``."""
    flat = y.movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1).float()  # [C, N * H * W]
    return flat.mean(1), flat.std(1)


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1  # Linear: [N, C] or tokens [N, T, C]


def _output_of(layer: nn.Module, forward: Callable, images: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    # clone: the output is captured before in-place ReLUs change it
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            forward(images)
    finally:
        hook.remove()
    return captured[0]


@torch.no_grad()
def _within_layer(layers: list[tuple[str, nn.Module]], forward: Callable, images: torch.Tensor,
                  beta: float | None, eps: float) -> None:
    for _, layer in layers:  # in forward order: each layer is normalised on the already-normalised inputs
        mean, std = _channel_stats(_output_of(layer, forward, images), _channel_dim(layer))
        std = std.clamp(min=eps)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.div_(std.view(shape).to(layer.weight.dtype))
        if layer.bias is not None:
            if beta is None:
                layer.bias.div_(std.to(layer.bias.dtype))
            else:
                layer.bias.copy_((beta + (layer.bias - mean) / std).to(layer.bias.dtype))


def _rate_ratios(layers: list[tuple[str, nn.Module]], forward: Callable, images: torch.Tensor,
                 generator: torch.Generator) -> tuple[list[float], torch.Tensor]:
    """r_k of every layer under a random Gaussian output gradient, and the output."""
    params = [layer.weight for _, layer in layers]
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:  # a frozen encoder still has a rate of change to measure
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            out = forward(images)
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
            grads = torch.autograd.grad((out * noise).sum(), params, allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    ratios = []
    for w, g in zip(params, grads):
        g = torch.zeros_like(w) if g is None else g
        ratios.append(math.sqrt(float(g.pow(2).mean() / w.pow(2).mean().clamp(min=1e-30))))
    return ratios, out.detach()


def _mean_output_std(out: torch.Tensor) -> float:
    return float(_channel_stats(out if out.dim() > 1 else out[:, None])[1].mean())


@torch.no_grad()
def _between_layer(layers: list[tuple[str, nn.Module]], forward: Callable, images: torch.Tensor,
                   iterations: int, tolerance: float, generator: torch.Generator) -> tuple[list[float], int]:
    modules = [m for _, m in layers]
    input_scale: dict[nn.Module, float] = {}

    def record(mod, inputs):
        input_scale[mod] = float(inputs[0].detach().abs().mean())

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    try:
        ratios, out = _rate_ratios(layers, forward, images, generator)
    finally:
        for h in hooks:
            h.remove()
    out_std = _mean_output_std(out)
    # a layer no gradient reaches (one followed by a BatchNorm whose scale is 0, as timm zero-initialises the last
    # BatchNorm of each residual block) has no rate of change to equalise: it keeps its scale and stays out of the
    # mean, which its log(0) would otherwise drag to -inf and blow every other layer up
    moving = [r > 0 and math.isfinite(r) for r in ratios]
    if not any(moving):
        return ratios, 0
    done = 0
    for done in range(1, iterations + 1):
        log_r = torch.tensor([r if m else 1.0 for r, m in zip(ratios, moving)]).log()
        active = log_r[torch.tensor(moving)]
        # geometric mean, times out_std^(1/L): the product of all scales then brings the output std to 1
        log_target = float(active.mean()) + math.log(max(out_std, 1e-30)) / len(active)
        if log_target != 0 and bool(((active / log_target - 1).abs() < tolerance).all()):
            done -= 1
            break
        scale = {m: math.exp((float(lr) - log_target) / 2) if move else 1.0
                 for m, lr, move in zip(modules, log_r, moving)}

        def adjust(mod, inputs, scale=scale):
            # earlier layers of this same pass are already rescaled: the bias follows its input's new scale
            current = float(inputs[0].abs().mean())
            if mod.bias is not None and input_scale[mod] > 0:
                mod.bias.mul_(current / input_scale[mod])
            input_scale[mod] = current
            mod.weight.mul_(scale[mod])
            if mod.bias is not None:
                mod.bias.mul_(scale[mod])

        hooks = [m.register_forward_pre_hook(adjust) for m in modules]
        try:
            forward(images)
        finally:
            for h in hooks:
                h.remove()
        ratios, out = _rate_ratios(layers, forward, images, generator)
        out_std = _mean_output_std(out)
    return ratios, done


def rescale_(model: nn.Module, images: torch.Tensor, *, within_layer: bool = True, between_layer: bool = True,
             beta: float | None = None, iterations: int = 10, tolerance: float = 0.01, seed: int = 0,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None, eps: float = 1e-8) -> RescaleReport:
    """Rescale ``model``'s convolution and linear layers in place from a calibration batch.

    Args:
        model: a network of ``nn.Conv2d`` / ``nn.Linear`` layers (a timm model); its train/eval mode is kept.
        images: a calibration batch ``[N, 3, H, W]``, normalised as the model expects, on the model's device.
        within_layer: divide each output channel by its std on ``images`` (Krähenbühl et al. §3.1).
        between_layer: equalise the layers' rates of change (§3.2).
        beta: within-layer target mean of every unit; None keeps each unit's mean/std ratio (pretrained weights).
        iterations: at most this many between-layer passes.
        tolerance: stop when every ``log r_k`` is within this relative distance of the target.
        seed: seed of the random output gradients of the between-layer step.
        forward: what to run; default ``model.forward_features`` (the trunk), else ``model``.
        eps: floor of a channel's std (dead units are left as they are).

    Returns:
        A :class:`RescaleReport`.

    Raises:
        ValueError: the model runs no conv / linear layer, or the rescaled model's activations are not finite
            (its weights are then restored).
    """
    forward = forward or _default_forward(model)
    was_training = model.training
    model.eval()  # dropout off; BatchNorm uses its running statistics rather than the calibration batch
    try:
        layers = rescaled_layers(model, images, forward)
        if not layers:
            raise ValueError(f"{type(model).__name__} runs no Conv2d or Linear layer: nothing to rescale")
        report = RescaleReport(layers=[n for n, _ in layers])
        before = [[p.detach().clone() for p in layer.parameters(recurse=False)] for _, layer in layers]
        if within_layer:
            _within_layer(layers, forward, images, beta, eps)
        if between_layer:
            ratios, report.iterations = _between_layer(layers, forward, images, iterations, tolerance,
                                                       torch.Generator().manual_seed(seed))
            report.rate_ratios = dict(zip(report.layers, ratios))
        for name, layer in layers:
            out = _output_of(layer, forward, images)
            report.output_std[name] = float(_channel_stats(out, _channel_dim(layer))[1].mean())
        broken = [name for name, std in report.output_std.items() if not math.isfinite(std)]
        if broken:  # leave the model as it came, and say where it went wrong
            with torch.no_grad():
                for (_, layer), saved in zip(layers, before):
                    for p, old in zip(layer.parameters(recurse=False), saved):
                        p.copy_(old)
            raise ValueError(f"rescaling {type(model).__name__} gave non-finite activations from layer {broken[0]} "
                             "on; the weights were left as they were (are the calibration images finite?)")
    finally:
        model.train(was_training)
    return report


@torch.no_grad()
def gaussian_init_(model: nn.Module, std: float = 0.01, seed: int = 0) -> nn.Module:
    """The paper's "random Gaussian" baseline: every conv / linear weight from N(0, std²), biases 0.

    ``std=0.01`` is the Caffe AlexNet recipe. On its own such a network's activations shrink layer by layer;
    :func:`rescale_` with ``beta`` set is Krähenbühl et al.'s fix.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, _LAYERS):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            if module.bias is not None:
                module.bias.zero_()
    return model


def rescale_encoder_(model: nn.Module, images: torch.Tensor, seed: int = 0) -> RescaleReport:
    """Rescale a :class:`~ce_pretrain.ContextEncoder`'s encoder in place from ``images`` ``[N, 3, H, W]`` in
    [0, 1] (whole images, normalised here as the model does), as a transfer's ``--rescale`` would rescale the same
    backbone; the bottleneck and decoder are left as they are.
    """
    encoder = model.encoder
    return rescale_(encoder, model.normalize(images), forward=encoder, seed=seed)
