"""The context-encoder objective: one training step, from masks to the updated weights (§3.2).

``ContextEncoderObjective`` owns everything the paper's loss needs: the mask rule (kind, overlap band, region
shapes; stored in the model's config so inference draws the same masks), the per-pixel loss weights, the
reconstruction term, and for the joint loss the discriminator with its adversarial terms and optimiser. The loop
(:mod:`ce_pretrain.engine`) only feeds it images and asks for masks.
"""

from __future__ import annotations

import torch

from .config import ConfigError, TrainConfig
from .discriminator import Discriminator
from .losses import ReconstructionLoss, discriminator_loss, generator_adversarial_loss, joint_loss
from .masks import MaskRule, ShapeBank
from .model import ContextEncoder
from .rescale import rescale_encoder_

__all__ = ["ContextEncoderObjective", "NonFiniteMonitor", "all_finite", "step_seed"]


def _compiled(module: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """``module`` compiled in place (``nn.Module.compile``: its calls go through ``torch.compile``, its parameter
    names and ``state_dict`` stay those of the plain module, so checkpoints and saved models do not change)."""
    if mode is not None:
        module.compile(mode=None if mode == "default" else mode)
    return module


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of one micro-batch's masks and dropout: a pure function of the run's seed and position, so a
    resumed run draws exactly what the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63)


class ContextEncoderObjective:
    """The context encoder's training objective for one step, on models already prepared by accelerate.

    Reconstruction only (§5.2 features): ``L = Lrec``. Joint (§5.1 inpainting): the discriminator takes a step on
    ``real | fake.detach()``, then the encoder-decoder on ``λrec·Lrec + λadv·Ladv`` with ``λrec = 1 − λadv``.

    Build it with :meth:`build`, which creates the models and optimisers and hands them to ``accelerator.prepare``.

    Args:
        accelerator: owns devices, precision, gradient accumulation and synchronisation.
        model: the (possibly DDP-wrapped) :class:`ContextEncoder`.
        discriminator: the (wrapped) adversary, or ``None`` for the reconstruction loss alone.
        opt_g: optimiser of the context encoder.
        opt_d: optimiser of the discriminator (with ``discriminator``).
        mask_rule: how masks are drawn and weighted; default: the model's own rule.
        loss: ``"l2"`` or ``"l1"`` reconstruction.
        adversarial_weight: λadv of the joint loss.
        high_pass_weight: weight of the high-passed reconstruction error (:class:`ReconstructionLoss`).
    """

    def __init__(self, accelerator, model, discriminator, opt_g, opt_d, *, mask_rule: MaskRule | None = None,
                 loss: str = "l2", adversarial_weight: float = 0.0, high_pass_weight: float = 0.0):
        self.accelerator = accelerator
        self.model, self.disc, self.opt_g, self.opt_d = model, discriminator, opt_g, opt_d
        self.core: ContextEncoder = accelerator.unwrap_model(model)
        self.mask_rule = mask_rule or self.core.mask_rule
        self.rec_loss = ReconstructionLoss(p=2 if loss == "l2" else 1, high_pass_weight=high_pass_weight)
        self.adversarial_weight = adversarial_weight
        self.disc_core = accelerator.unwrap_model(discriminator) if discriminator is not None else None
        self._model_params = [p for p in model.parameters() if p.requires_grad]
        self._disc_params = [p for p in self.disc_core.parameters()] if self.disc_core is not None else []
        self.monitor = NonFiniteMonitor(accelerator.device)
        # the rates the optimisers were built with: the schedule scales these, never the rate it last set
        self._base_lrs = [(opt, [float(g["lr"]) for g in opt.param_groups])
                          for opt in (opt_g, opt_d) if opt is not None]
        self.lr_factor = 1.0
        # the other settings the flags gave the optimisers, which a checkpoint's param groups replace on resume
        self._settings = [(opt, [{k: g[k] for k in ("betas", "weight_decay") if k in g} for g in opt.param_groups])
                          for opt in (opt_g, opt_d) if opt is not None]

    def apply_flag_settings(self) -> None:
        """Put this run's learning rates, betas and weight decay back into the optimisers after a checkpoint's
        param groups replaced them (a resume that changed them with ``--allow-recipe-change``)."""
        for opt, settings in self._settings:
            for group, setting in zip(opt.param_groups, settings):
                group.update(setting)
        self.scale_lr(self.lr_factor)

    @property
    def optimizers(self) -> list:
        """The run's (wrapped) optimisers: the context encoder's, then the discriminator's if any."""
        return [opt for opt in (self.opt_g, self.opt_d) if opt is not None]

    @property
    def lr(self) -> float:
        """The context encoder's current learning rate (a float, whatever the optimiser stores)."""
        return self._base_lrs[0][1][0] * self.lr_factor

    def scale_lr(self, factor: float) -> None:
        """Set every optimiser's rate to ``factor`` × its base rate (the discriminator's scaled alike).

        A rate stored as a tensor (a step captured in a CUDA graph reads it there) is overwritten in place."""
        self.lr_factor = factor
        for opt, bases in self._base_lrs:
            for group, base in zip(opt.param_groups, bases):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base * factor)
                else:
                    group["lr"] = base * factor

    def state_tensors(self) -> list[torch.Tensor]:
        """Every parameter, buffer and optimiser-state tensor of the run (what a checkpoint saves)."""
        found = [*self.core.state_dict().values()]
        if self.disc_core is not None:
            found += self.disc_core.state_dict().values()
        for opt in (self.opt_g, self.opt_d):
            if opt is not None:
                found += [v for state in opt.state_dict()["state"].values() for v in state.values()
                          if isinstance(v, torch.Tensor)]
        return found

    @classmethod
    def build(cls, cfg: TrainConfig, accelerator, shapes: ShapeBank | None = None,
              init_images: torch.Tensor | None = None) -> ContextEncoderObjective:
        """Models, optimisers and mask rule of a run, prepared by ``accelerator``.

        Args:
            cfg: the run's configuration.
            accelerator: the run's ``Accelerator``.
            shapes: object silhouettes for random regions (``--mask-shapes``); default: ``cfg.mask_source``.
            init_images: training crops ``[N, 3, S, S]`` in [0, 1] on which the new encoder is rescaled
                (``--encoder-init rescale``), the same on every process; ``None`` keeps the backbone's init.
        """
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = ContextEncoder(**cfg.model_kwargs()).to(memory_format=memory)
        if init_images is not None:
            model.to(accelerator.device)
            try:
                report = rescale_encoder_(model, init_images.to(accelerator.device), seed=cfg.seed)
            except ValueError as err:  # e.g. a backbone without conv / linear layers, or one that overflows
                raise ConfigError(f"--encoder-init rescale: {err}") from None
            accelerator.print(f"encoder init: {cfg.backbone}'s, rescaled on {len(init_images)} training images "
                              f"(Krähenbühl et al.; {len(report.layers)} layers)")
        rule = model.mask_rule
        rule.source = shapes if shapes is not None else cfg.mask_source
        fused = _fused_adam(accelerator)
        opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999),
                                 weight_decay=cfg.weight_decay, fused=fused)
        kwargs = dict(mask_rule=rule, loss=cfg.loss, adversarial_weight=cfg.adversarial_weight,
                      high_pass_weight=cfg.high_pass_weight)
        if not cfg.adversarial:
            model, opt_g = accelerator.prepare(model, opt_g)
            return cls(accelerator, _compiled(model, cfg.compile), None, opt_g, None, **kwargs)
        disc = Discriminator(model.pred_size).to(memory_format=memory)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.discriminator_lr or cfg.lr / 10, betas=(cfg.beta1, 0.999),
                                 fused=fused)
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
        return cls(accelerator, _compiled(model, cfg.compile), _compiled(disc, cfg.compile), opt_g, opt_d, **kwargs)

    def masks(self, batch: int, seed: int, device: torch.device | str) -> torch.Tensor:
        """The masks of one micro-batch, bool ``[B, 1, S, S]``, drawn from ``seed`` (see :func:`step_seed`).

        The generator lives on ``device``, so on a GPU the masks are drawn there without a host round trip (the
        same seed then gives other masks on a GPU than on the CPU, but the same ones on every run of a device).
        """
        return self.mask_rule.sample(batch, torch.Generator(device=device).manual_seed(seed), device=device)

    def step(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images ``[B, 3, H, W]`` in [0, 1], mask bool ``[B, 1, H, W]`` → (loss, logged terms), device tensors.

        Nothing here waits for the device. An optimiser step whose gradients are not finite (on any process: DDP
        has averaged them) is skipped on the device, so it leaves the weights *and* Adam's moments and step count
        unchanged; :attr:`monitor` counts such steps for the loop to read every few steps.
        """
        acc, core = self.accelerator, self.core
        weights = core.crop(self.mask_rule.weights(mask))
        target = core.crop(images)
        with acc.accumulate(*([self.model, self.disc] if self.disc is not None else [self.model])):
            with acc.autocast():
                pred = self.model(images, mask)
            rec = self.rec_loss(pred, target, weights)
            logs = {"loss/reconstruction": rec}
            loss, skipped_d = rec, None
            if self.disc is not None:
                # The adversary judges what the reconstruction loss asks for, not conditioned on the context
                # (§3.2): the predicted region, with every pixel the loss leaves free (outside a random region's
                # hole) set to 0, the dataset mean, in both real and predicted images alike.
                judged = (weights > 0).float()
                fake, real = core.normalize(pred.float()) * judged, core.normalize(target) * judged
                with acc.autocast():  # one forward for real and fake: DDP-safe, and BatchNorm sees both
                    logits = self.disc(torch.cat([real, fake.detach()]))
                d_loss = discriminator_loss(logits[: len(real)], logits[len(real):])
                acc.backward(d_loss)
                skipped_d = self._update(self.opt_d, self._disc_params, d_loss)
                # The generator's term must not leave gradients in the discriminator (its next step would use
                # them), so the adversary is frozen and called outside DDP for this forward. It sees the same
                # real | fake batch as the adversary's own step: its BatchNorm normalises with the batch's
                # statistics, and on predictions alone it would call them real however well it tells them apart.
                with _frozen(self._disc_params), acc.autocast():
                    adv = generator_adversarial_loss(self.disc_core(torch.cat([real, fake]))[len(real):])
                loss = joint_loss(rec, adv, 1 - self.adversarial_weight, self.adversarial_weight)
                logs.update({"loss/adversarial": adv, "loss/discriminator": d_loss})
            acc.backward(loss)
            skipped = self._update(self.opt_g, self._model_params, loss)
        if skipped is not None:
            self.monitor.record(skipped if skipped_d is None else torch.maximum(skipped, skipped_d))
        return loss, logs

    def _update(self, opt, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor | None:
        """Step ``opt`` unless its gradients are non-finite; returns 1.0 (skipped) or 0.0 as a device tensor, or
        ``None`` on a micro-batch that only accumulates gradients."""
        if not self.accelerator.sync_gradients:
            return None
        if self.accelerator.scaler is not None:
            # fp16: the GradScaler finds non-finite gradients itself and skips the step (and shrinks its scale);
            # only a non-finite loss counts as a divergence, not the scaler's routine overflows.
            opt.step()
            opt.zero_grad(set_to_none=True)
            return (~torch.isfinite(loss.detach())).float()
        grads = [p.grad for p in params if p.grad is not None]
        # the 2-norm overflows only for gradients of norm ~1e19: a diverged step anyway
        found_inf = (~torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))).float()
        inner = opt.optimizer
        if inner.defaults.get("fused"):
            # fused Adam reads ``found_inf`` on the device and, when it is 1, leaves parameters, moments and
            # step count as they were (the mechanism GradScaler uses): no host sync
            inner.found_inf = found_inf
            try:
                opt.step()
            finally:
                del inner.found_inf
        elif not found_inf.item():  # other optimisers cannot skip on the device: one sync per step
            opt.step()
        opt.zero_grad(set_to_none=True)
        return found_inf


class NonFiniteMonitor:
    """Skipped optimiser steps, counted on the device and read by the host only when asked (one sync).

    Args:
        device: where the counters live.
        consecutive: skipped steps in a row before this run started (from a checkpoint).
    """

    def __init__(self, device: torch.device | str, consecutive: int = 0):
        self.run = torch.full((), float(consecutive), device=device)  # skipped steps in a row, up to now
        self.longest = self.run.clone()  # longest such run since the last read
        self.total = torch.zeros((), device=device)  # skipped steps since the last read

    def record(self, skipped: torch.Tensor) -> None:
        """Count one optimiser step; ``skipped``: 0-dim float, 1.0 when the step was skipped."""
        self.run.mul_(skipped).add_(skipped)  # run = skipped · (run + 1)
        torch.maximum(self.longest, self.run, out=self.longest)
        self.total.add_(skipped)

    def read(self) -> tuple[int, int, int]:
        """(skipped in a row now, longest run up to a step since the last read, skipped since the last read);
        resets the last two (a run still going on keeps counting). Synchronises with the device."""
        run, longest, total = (int(v) for v in torch.stack([self.run, self.longest, self.total]).tolist())
        self.longest.zero_()
        self.total.zero_()
        return run, longest, total


class _frozen:
    """Context in which ``params`` collect no gradients (autograd still flows through them to the inputs)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _fused_adam(accelerator) -> bool | None:
    """Fused Adam (one kernel over all parameters) where PyTorch has it: CPU and CUDA. It can also skip a step on
    the device (``found_inf``), which keeps the training step free of host syncs."""
    return True if accelerator.device.type in ("cpu", "cuda") else None


def all_finite(tensors) -> bool:
    """Whether every floating tensor of ``tensors`` is finite (one sync; for checkpoints, not for every step)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_floating_point(t) and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True
