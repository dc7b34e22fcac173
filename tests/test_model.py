import pytest
import torch

from ce_pretrain import ContextEncoder, UnknownBackboneError, make_masks
from ce_pretrain.layers import ChannelWiseFC

ZOO = ["resnet18", "resnet50", "vgg11", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002",
       "densenet121"]


def test_alexnet_default_predicts_full_image(gen):
    model = ContextEncoder()
    assert model.backbone_name == "alexnet" and model.image_size == 227
    cfc = model.bottleneck[0]
    assert isinstance(cfc, ChannelWiseFC) and cfc.weight.numel() == 331_776
    assert model.bottleneck[1].p == 0.5  # dropout on the channel-wise FC only
    x = torch.rand(2, 3, 227, 227)
    mask = make_masks("random-region", 2, 227, 227, generator=gen)
    pred = model(x, mask)
    assert pred.shape == (2, 3, 227, 227) and pred.dtype == torch.float32
    assert model.feature_size == (6, 6) and model.feature_channels == 256


def test_inpainting_preset_predicts_center(gen):
    model = ContextEncoder("dcgan_encoder", image_size=128, pred_size=64, overlap=7, bottleneck="fc",
                           bottleneck_dim=4000)
    assert model.bottleneck[1].out_features == 4000
    x = torch.rand(3, 3, 128, 128)
    pred = model(x, make_masks("center", 3, 128, 128, overlap=7))
    assert pred.shape == (3, 3, 64, 64)
    assert model.pred_box == (32, 32, 64, 64)
    assert model.crop(x).shape == (3, 3, 64, 64)


@pytest.mark.parametrize("name", ZOO)
def test_timm_zoo_backbones_train(name):
    model = ContextEncoder(name, image_size=224).train()
    x = torch.rand(2, 3, 224, 224)
    mask = make_masks("random-block", 2, 224, 224, generator=torch.Generator().manual_seed(1))
    pred = model(x, mask)
    assert pred.shape == (2, 3, 224, 224)
    pred.mean().backward()
    # every parameter takes part (DDP without find_unused_parameters needs that)
    assert all(p.grad is not None for p in model.parameters()), name


def test_vit_tokens_become_a_map():
    model = ContextEncoder("vit_tiny_patch16_224", image_size=224)
    assert model.feature_size == (14, 14)
    assert model(torch.rand(1, 3, 224, 224), torch.zeros(1, 1, 224, 224, dtype=torch.bool)).shape == (1, 3, 224, 224)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UnknownBackboneError, match="resnet50"):
        ContextEncoder("resnet5O")
    with pytest.raises(UnknownBackboneError, match="not a timm model"):
        ContextEncoder("definitely_not_a_model")


def test_dropped_pixels_do_not_reach_the_model(gen):
    """The model fills the hole itself: what was there cannot change the prediction."""
    model = ContextEncoder("resnet18", image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    mask = make_masks("random-region", 2, 64, 64, generator=gen)
    scribbled = torch.where(mask, torch.rand_like(x), x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), model(scribbled, mask))
        filled = model.mask_input(x, mask)
    assert (filled.masked_select(mask.expand_as(filled)) == 0).all()  # the dataset mean, once normalised
    # ...whereas context pixels do change it
    changed = torch.where(mask, x, torch.rand_like(x))
    with torch.no_grad():
        assert not torch.allclose(model(x, mask), model(changed, mask))


def test_paste_changes_only_the_hole(gen):
    model = ContextEncoder("dcgan_encoder", image_size=128, pred_size=64, overlap=7, bottleneck="fc")
    x = torch.rand(1, 3, 128, 128)
    mask = make_masks("center", 1, 128, 128, overlap=7)
    out = model.paste(torch.zeros(1, 3, 64, 64), x, mask)
    assert (out[mask.expand_as(out)] == 0).all()
    assert torch.equal(out[~mask.expand_as(out)], x[~mask.expand_as(x)])


def test_bad_inputs_are_refused_clearly():
    model = ContextEncoder("resnet18", image_size=64)
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="64×64 images"):
        model(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(x, torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="mask must be"):
        model(x, torch.zeros(2, 3, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="bottleneck"):
        ContextEncoder("resnet18", bottleneck="dense")
    with pytest.raises(ValueError, match="pred_size"):
        ContextEncoder("resnet18", image_size=64, pred_size=128)


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_decoder_norm_and_fc_dropout_are_part_of_the_saved_architecture(tmp_path, gen):
    base = ContextEncoder("alexnet", image_size=99)
    plain = ContextEncoder("alexnet", image_size=99, decoder_norm="none", dropout=0.0)
    ups = sum(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Linear)) for m in base.decoder.modules())
    assert _count(base.decoder, torch.nn.BatchNorm2d) == ups > 0  # BatchNorm after each up-convolution
    assert _count(plain.decoder, torch.nn.BatchNorm2d) == 0
    assert all(m.bias is not None for m in plain.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d))
    assert _count(base, torch.nn.Dropout) == 1 and base.bottleneck[1].p == 0.5
    assert _count(plain, torch.nn.Dropout) == 0
    plain.train()
    x, mask = torch.rand(2, 3, 99, 99, generator=gen), make_masks("center", 2, 99, 99)
    torch.manual_seed(0)
    first = plain(x, mask)
    torch.manual_seed(1)
    assert torch.equal(first, plain(x, mask))  # no dropout draw: training-mode outputs do not depend on the RNG
    plain.save_pretrained(tmp_path / "m")
    loaded = ContextEncoder.from_pretrained(tmp_path / "m")
    assert loaded.config["decoder_norm"] == "none" and loaded.config["dropout"] == 0.0
    assert _count(loaded.decoder, torch.nn.BatchNorm2d) == 0 and _count(loaded, torch.nn.Dropout) == 0
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="norm must be one of"):
        ContextEncoder("alexnet", image_size=99, decoder_norm="layer")
    with pytest.raises(ValueError, match="dropout must be in"):
        ContextEncoder("alexnet", image_size=99, dropout=1.0)
