import math

import pytest
import torch

from ce_pretrain import (
    Discriminator,
    ReconstructionLoss,
    discriminator_loss,
    generator_adversarial_loss,
    joint_loss,
    loss_weights,
    make_masks,
)
from ce_pretrain.losses import high_pass


def test_overlap_band_weights_match_the_inpainting_preset():
    mask = make_masks("center", 1, 128, 128, overlap=7)
    w = loss_weights(mask, overlap=7)
    support = (w > 0)[0, 0].nonzero()
    # hole (50 px) + 7 px band = the 64 px predicted centre
    assert support[:, 0].min() == 32 and support[:, 0].max() == 95
    assert (w[mask] == 1).all()
    band = (w > 0) & ~mask
    assert (w[band] == 10).all() and band.sum() == 64 * 64 - 50 * 50


def test_l2_is_the_mean_over_the_hole():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 4:8, 4:12] = True
    loss = ReconstructionLoss()(pred, target, loss_weights(mask))
    ref = ((pred - target) ** 2)[mask.expand_as(pred)].mean()  # reference: plain mean over dropped values
    torch.testing.assert_close(loss, ref)
    l1 = ReconstructionLoss(p=1)(pred, target, loss_weights(mask))
    torch.testing.assert_close(l1, (pred - target).abs()[mask.expand_as(pred)].mean())


def test_weighted_band_counts_ten_times():
    pred, target = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 3:5, 3:5] = True
    w = loss_weights(mask, overlap=1)
    # 4 hole pixels at 1, 12 band pixels at 10, over 16 values
    assert ReconstructionLoss()(pred, target, w).item() == pytest.approx((4 + 120) / 16)


@pytest.mark.parametrize("p, high_pass_weight", [(1, 0.0), (2, 0.0), (2, 1.0)])
def test_no_gradient_outside_the_loss_region(p, high_pass_weight, gen):
    pred = torch.rand(2, 3, 32, 32, requires_grad=True)
    target = torch.rand(2, 3, 32, 32)
    mask = make_masks("random-region", 2, 32, 32, generator=gen)
    w = loss_weights(mask, overlap=2)
    ReconstructionLoss(p, high_pass_weight)(pred, target, w).backward()
    outside = (w == 0).expand_as(pred)
    assert (pred.grad[outside] == 0).all()
    assert (pred.grad[~outside] != 0).any()


def test_adversarial_terms_match_the_log_likelihood():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    d = -(torch.log(sig(real)) + torch.log(1 - sig(fake))).mean()
    g = -torch.log(sig(fake)).mean()
    torch.testing.assert_close(discriminator_loss(real, fake), d)
    torch.testing.assert_close(generator_adversarial_loss(fake), g)
    assert joint_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(0.999 * 2 + 0.001 * 3)


def test_adversarial_terms_stay_finite_in_half_precision():
    fake = torch.tensor([40.0, -40.0], dtype=torch.float16)
    assert math.isfinite(discriminator_loss(fake, fake).item())
    assert math.isfinite(generator_adversarial_loss(fake).item())


def test_discriminator_sees_patches_only():
    d = Discriminator(64)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]  # the original netD for 64 px
    assert d(torch.randn(4, 3, 64, 64)).shape == (4,)
    assert Discriminator(227)(torch.randn(2, 3, 227, 227)).shape == (2,)


def test_high_pass_keeps_structure_and_drops_colour():
    assert high_pass(torch.full((1, 3, 12, 12), 0.7)).abs().max() < 1e-6  # borders too: the mean is of the image
    edge = torch.zeros(1, 1, 12, 12)
    edge[..., 6:] = 1
    assert high_pass(edge)[..., 5].max() < 0 < high_pass(edge)[..., 6].min()  # an edge survives


def test_high_pass_weight_charges_wrong_structure_not_wrong_colour():
    """The high-passed term costs nothing for a prediction off by a flat colour inside the hole, and adds to the
    cost of one with the right mean colour but the wrong texture."""
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 4:28, 4:28] = True
    w = loss_weights(mask)
    plain, detailed = ReconstructionLoss(), ReconstructionLoss(high_pass_weight=2.0)
    off_colour = target + 0.2 * mask
    flat = torch.where(mask, target[mask.expand_as(target)].reshape(3, -1).mean(1).view(1, 3, 1, 1), target)
    # a flat offset's high-pass is not zero only within 3 px of the hole's edge (the local mean sees outside)
    assert detailed(off_colour, target, w) < plain(off_colour, target, w) * 1.5
    assert detailed(flat, target, w) > plain(flat, target, w) * 2
    torch.testing.assert_close(ReconstructionLoss(high_pass_weight=0.0)(flat, target, w), plain(flat, target, w))
    with pytest.raises(ValueError, match="high_pass_weight"):
        ReconstructionLoss(high_pass_weight=-1)
