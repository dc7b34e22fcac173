import pytest
import timm
import torch
from torch import nn

import ce_pretrain  # noqa: F401  (registers the encoders)

SIZES = {"alexnet": 227, "alexnet_poolfree": 227, "dcgan_encoder": 128}


@pytest.mark.parametrize("name", list(SIZES))
def test_registered_in_timm(name):
    assert timm.is_model(name)
    assert name in timm.list_models("alexnet*") + timm.list_models("dcgan*")


@pytest.mark.parametrize("name", list(SIZES))
def test_classifier_contract(name):
    model = timm.create_model(name, num_classes=20).eval()
    s = SIZES[name]
    x = torch.randn(2, 3, s, s)
    assert model(x).shape == (2, 20)
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    assert model.get_classifier().out_features == 5


@pytest.mark.parametrize("name", list(SIZES))
def test_feature_info_matches_real_feature_maps(name):
    s = SIZES[name]
    feat = timm.create_model(name, features_only=True).eval()
    outs = feat(torch.randn(1, 3, s, s))
    assert len(outs) == len(feat.feature_info.channels())
    for out, chans, red in zip(outs, feat.feature_info.channels(), feat.feature_info.reduction()):
        assert out.shape[1] == chans
        # AlexNet's convolutions are unpadded, so a map is within 2 px of input / reduction
        assert abs(out.shape[-1] - s / red) < 2, (out.shape, red)
    # the intermediate API agrees with features_only
    model = timm.create_model(name).eval()
    inter = model.forward_intermediates(torch.randn(1, 3, s, s), intermediates_only=True)
    assert [t.shape for t in inter] == [o.shape for o in outs]


def test_alexnet_paper_shapes():
    model = timm.create_model("alexnet", num_classes=0).eval()
    assert model.forward_features(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    # conv1-conv5 of the Caffe reference model, grouped conv2/4/5
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.groups) for c in convs] == [
        (3, 96, 11, 4, 1), (96, 256, 5, 1, 2), (256, 384, 3, 1, 1), (384, 384, 3, 1, 2), (384, 256, 3, 1, 2)]
    expected = sum(c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] ** 2 + c.out_channels for c in convs)
    assert sum(p.numel() for p in model.features.parameters()) == expected


def test_alexnet_poolfree_replaces_every_pool_by_conv():
    pooled = timm.create_model("alexnet")
    free = timm.create_model("alexnet_poolfree")
    assert sum(isinstance(m, nn.MaxPool2d) for m in pooled.modules()) == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in free.modules())
    for idx in (3, 7, 14):  # the pools' places hold a 3×3 stride-2 convolution
        conv = free.features[idx][0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    x = torch.randn(1, 3, 227, 227)
    assert free.forward_features(x).shape == pooled.forward_features(x).shape == (1, 256, 6, 6)


def test_dcgan_encoder_matches_original_netE():
    model = timm.create_model("dcgan_encoder", num_classes=0).eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (64, 4, 2), (64, 4, 2), (128, 4, 2), (256, 4, 2), (512, 4, 2)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 4  # none after the first conv
    assert model.forward_features(torch.randn(2, 3, 128, 128)).shape == (2, 512, 4, 4)


def test_prune_keeps_timm_keys():
    model = timm.create_model("alexnet", num_classes=0)
    keys = set(model.state_dict())
    model.prune_intermediate_layers(indices=1, prune_head=True)
    pruned = set(model.state_dict())
    assert pruned < keys and all(k.startswith("features.") for k in pruned)
    assert model.forward_features(torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    model.prune_intermediate_layers(indices=[0, 1])  # cut after relu2
    assert model.num_features == 256 and len(model.features) == 6
