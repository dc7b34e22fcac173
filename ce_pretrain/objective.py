"""The context-encoder objective: one training step, from masks to the updated weights (§3.2).

``ContextEncoderObjective`` owns everything the paper's loss needs: the mask rule (kind, overlap band, region
shapes; stored in the model's config so inference draws the same masks), the per-pixel loss weights, the
reconstruction term, and for the joint loss the discriminator with its adversarial terms and optimiser. The loop
(:mod:`ce_pretrain.engine`) only feeds it images and asks for masks.
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .discriminator import Discriminator
from .losses import ReconstructionLoss, discriminator_loss, generator_adversarial_loss, joint_loss
from .masks import MaskRule, ShapeBank
from .model import ContextEncoder

__all__ = ["ContextEncoderObjective", "step_seed"]


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
    """

    def __init__(self, accelerator, model, discriminator, opt_g, opt_d, *, mask_rule: MaskRule | None = None,
                 loss: str = "l2", adversarial_weight: float = 0.0):
        self.accelerator = accelerator
        self.model, self.disc, self.opt_g, self.opt_d = model, discriminator, opt_g, opt_d
        self.core: ContextEncoder = accelerator.unwrap_model(model)
        self.mask_rule = mask_rule or self.core.mask_rule
        self.rec_loss = ReconstructionLoss(p=2 if loss == "l2" else 1)
        self.adversarial_weight = adversarial_weight

    @classmethod
    def build(cls, cfg: TrainConfig, accelerator, shapes: ShapeBank | None = None) -> ContextEncoderObjective:
        """Models, optimisers and mask rule of a run, prepared by ``accelerator``.

        Args:
            cfg: the run's configuration.
            accelerator: the run's ``Accelerator``.
            shapes: object silhouettes for random regions (``--mask-shapes``); default: ``cfg.mask_source``.
        """
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = ContextEncoder(**cfg.model_kwargs()).to(memory_format=memory)
        rule = model.mask_rule
        rule.source = shapes if shapes is not None else cfg.mask_source
        fused = _fused_adam(accelerator)
        opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999),
                                 weight_decay=cfg.weight_decay, fused=fused)
        kwargs = dict(mask_rule=rule, loss=cfg.loss, adversarial_weight=cfg.adversarial_weight)
        if not cfg.adversarial:
            model, opt_g = accelerator.prepare(model, opt_g)
            return cls(accelerator, model, None, opt_g, None, **kwargs)
        disc = Discriminator(model.pred_size).to(memory_format=memory)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.discriminator_lr or cfg.lr / 10, betas=(cfg.beta1, 0.999),
                                 fused=fused)
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
        return cls(accelerator, model, disc, opt_g, opt_d, **kwargs)

    def masks(self, batch: int, seed: int, device: torch.device | str) -> torch.Tensor:
        """The masks of one micro-batch, bool ``[B, 1, S, S]``, drawn from ``seed`` (see :func:`step_seed`)."""
        return self.mask_rule.sample(batch, torch.Generator().manual_seed(seed), device=device)

    def step(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict, bool]:
        """images ``[B, 3, H, W]`` in [0, 1], mask bool ``[B, 1, H, W]`` → (loss, logged terms, finite?).

        A non-finite loss (on any process) skips the backward pass, so the step leaves the weights unchanged.
        """
        acc, core = self.accelerator, self.core
        weights = core.crop(self.mask_rule.weights(mask))
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
                loss = joint_loss(rec, adv, 1 - self.adversarial_weight, self.adversarial_weight)
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
