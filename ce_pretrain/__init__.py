"""ce-pretrain: Context Encoder pretraining (Pathak et al., CVPR 2016) for any timm backbone.

``import ce_pretrain`` registers the paper's encoders (``alexnet``, ``alexnet_poolfree``, ``dcgan_encoder``) in
timm and exposes the model, masks and losses. Training (accelerate) and the transfer adapters (detectron2,
mmsegmentation) are imported only where they are used.
"""

from . import backbones
from .discriminator import Discriminator
from .losses import ReconstructionLoss, discriminator_loss, generator_adversarial_loss, joint_loss, loss_weights
from .masks import MASK_KINDS, ShapeBank, make_masks, mask_coverage
from .model import ContextEncoder, IncompatibleCheckpointError, UnknownBackboneError

__version__ = "0.1.0"

__all__ = [
    "MASK_KINDS",
    "ContextEncoder",
    "Discriminator",
    "IncompatibleCheckpointError",
    "ReconstructionLoss",
    "ShapeBank",
    "UnknownBackboneError",
    "backbones",
    "discriminator_loss",
    "generator_adversarial_loss",
    "joint_loss",
    "loss_weights",
    "make_masks",
    "mask_coverage",
]
