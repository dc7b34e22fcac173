"""ce_pretrain/rescale.py: Krähenbühl et al.'s within-layer and between-layer rescaling on real conv nets."""

import math

import pytest
import timm
import torch
from torch import nn

import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)
from ce_pretrain.rescale import gaussian_init_, rescale_, rescaled_layers


def _homogeneous_net(seed=0):
    """ReLU / max-pool / conv / linear only: positively homogeneous, so rescaling keeps it up to one factor."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    net(torch.zeros(1, 3, 32, 32))
    with torch.no_grad():  # badly scaled on purpose: the layers then learn at very different speeds
        net[0].weight.mul_(30)
        net[0].bias.uniform_(-1, 1)
        net[3].weight.mul_(0.05)
        net[5].bias.uniform_(0, 0.5)
    return net


def _channel_std(out, channel_dim=1):
    return out.movedim(channel_dim, 0).reshape(out.shape[channel_dim], -1).std(1)


def _outputs(net, images):
    """Output of every conv / linear layer, in forward order."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
             for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(images)
    for h in hooks:
        h.remove()
    return outs


def test_within_layer_gives_every_unit_unit_std_on_the_calibration_batch(gen):
    net = _homogeneous_net()
    images = torch.randn(16, 3, 32, 32, generator=gen)
    before = _outputs(net, images)
    assert max(float(_channel_std(o).max()) for o in before[:-1]) > 3  # the property is not there to start with
    report = rescale_(net, images, between_layer=False, forward=net)
    for out, name in zip(_outputs(net, images), report.layers):
        dim = -1 if out.dim() == 2 else 1
        assert torch.allclose(_channel_std(out, dim), torch.ones(out.shape[dim]), atol=1e-3), name
        assert report.output_std[name] == pytest.approx(1, abs=1e-3)


def test_within_layer_with_beta_sets_every_units_mean(gen):
    net = _homogeneous_net()
    images = torch.randn(16, 3, 32, 32, generator=gen)
    rescale_(net, images, between_layer=False, beta=0.5, forward=net)
    for out in _outputs(net, images):
        dim = -1 if out.dim() == 2 else 1
        means = out.movedim(dim, 0).reshape(out.shape[dim], -1).mean(1)
        assert torch.allclose(means, torch.full_like(means, 0.5), atol=1e-3)


def test_between_layer_equalises_rates_and_keeps_the_function_up_to_one_factor(gen):
    net = _homogeneous_net()
    images = torch.randn(16, 3, 32, 32, generator=gen)
    with torch.no_grad():
        before = net(images)
    report = rescale_(net, images, within_layer=False, iterations=20, forward=net)
    ratios = list(report.rate_ratios.values())
    assert max(ratios) / min(ratios) < 1.3, report.rate_ratios
    with torch.no_grad():
        after = net(images)
    factor = (after * before).sum() / before.pow(2).sum()
    assert not math.isclose(float(factor), 1.0, rel_tol=0.05)  # it did rescale...
    torch.testing.assert_close(after, factor * before, rtol=1e-3, atol=1e-4 * float(after.abs().max()))  # ...only


def test_rate_ratios_start_far_apart(gen):
    """The badly scaled net really has unequal rates, so the equalisation test above can fail."""
    net = _homogeneous_net()
    images = torch.randn(16, 3, 32, 32, generator=gen)
    report = rescale_(net, images, within_layer=False, iterations=0, forward=net)
    ratios = list(report.rate_ratios.values())
    assert max(ratios) / min(ratios) > 10


def test_alexnet_trunk_is_rescaled_in_forward_order_and_left_in_its_mode(gen):
    model = timm.create_model("alexnet", num_classes=0)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen encoder (linear probe) can still be rescaled
    images = torch.randn(4, 3, 99, 99, generator=gen)
    names = [n for n, _ in rescaled_layers(model, images)]
    assert names == ["features.0", "features.4", "features.8", "features.10", "features.12"]  # trunk, not fc6/7
    report = rescale_(model, images, between_layer=False)
    assert model.training
    assert all(v == pytest.approx(1, abs=1e-3) for v in report.output_std.values())
    assert not any(p.requires_grad for p in model.parameters())


def test_gaussian_init_then_data_dependent_init_is_usable(gen):
    """The paper's random Gaussian: σ=0.01 starves the deep layers; Krähenbühl's rescaling restores them."""
    model = gaussian_init_(timm.create_model("alexnet", num_classes=0), std=0.01)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(abs(float(m.weight.detach().std()) - 0.01) < 1e-3 and not m.bias.any() for m in conv)
    images = torch.randn(4, 3, 99, 99, generator=gen)
    with torch.no_grad():
        starved = float(model.forward_features(images).std())
    assert starved < 0.01
    rescale_(model, images, beta=0.0, between_layer=False)
    with torch.no_grad():
        assert float(model.forward_features(images).std()) > 30 * starved


def test_a_model_without_layers_is_one_clear_error(gen):
    with pytest.raises(ValueError, match="nothing to rescale"):
        rescale_(nn.Sequential(nn.ReLU()), torch.randn(2, 3, 8, 8, generator=gen), forward=None)


def test_resnet_with_zero_initialised_blocks_rescales_to_finite_weights(gen):
    """timm zero-initialises the last BatchNorm of each residual block, so no gradient reaches the block's convs:
    their rate of change is 0. It used to enter the geometric mean as log(1e-30) and blow the stem up to NaN."""
    model = timm.create_model("resnet18", num_classes=0)
    images = torch.randn(8, 3, 64, 64, generator=gen)
    report = rescale_(model, images)
    assert all(math.isfinite(v) for v in report.output_std.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    still = [n for n, r in report.rate_ratios.items() if r == 0]
    assert len(still) == 16 and "layer1.0.conv2" in still  # both convs of every block
    moving = [r for r in report.rate_ratios.values() if r > 0]
    assert max(moving) / min(moving) < 1.5  # the stem and the shortcuts were equalised
    with torch.no_grad():
        assert float(model.forward_features(images).std()) > 0.1


def test_non_finite_result_restores_the_weights_and_says_where(gen):
    model = timm.create_model("alexnet", num_classes=0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 99, 99, generator=gen)
    images[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite activations from layer features.0"):
        rescale_(model, images)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_context_encoder_rescaling_touches_the_encoder_only(gen):
    from ce_pretrain import ContextEncoder
    from ce_pretrain.rescale import rescale_encoder_

    torch.manual_seed(0)
    model = ContextEncoder(backbone="alexnet", image_size=99)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(8, 3, 99, 99, generator=gen)  # pixels in [0, 1]: normalised as the model does
    with torch.no_grad():
        small = float(model.encoder(model.normalize(images)).std())
    report = rescale_encoder_(model, images)
    assert len(report.layers) == 5
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"encoder"}
    with torch.no_grad():
        assert float(model.encoder(model.normalize(images)).std()) > 5 * small  # timm's AlexNet starts at ~0.04
