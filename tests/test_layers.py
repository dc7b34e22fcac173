import torch
from torch import nn

from ce_pretrain.layers import ChannelWiseFC, UpConvDecoder


def test_channelwise_fc_parameter_count_is_m_n4():
    layer = ChannelWiseFC(256, 6, 6)
    assert layer.weight.numel() == 256 * 6**4 == 331_776
    assert layer.bias.numel() == 256 * 36


def test_channelwise_fc_equals_one_linear_per_map():
    torch.manual_seed(0)
    layer = ChannelWiseFC(4, 3, 5)
    x = torch.randn(2, 4, 3, 5)
    ref = []
    for c in range(4):  # reference: a separate fully-connected layer for each feature map
        fc = nn.Linear(15, 15)
        fc.weight.data = layer.weight[c].t().clone()
        fc.bias.data = layer.bias[c, 0].clone()
        ref.append(fc(x[:, c].reshape(2, 15)).reshape(2, 3, 5))
    torch.testing.assert_close(layer(x), torch.stack(ref, 1))


def test_channelwise_fc_never_mixes_maps_but_connects_all_locations():
    layer = ChannelWiseFC(3, 4, 4)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    layer(x)[0, 1, 0, 0].backward()
    grad = x.grad[0].abs().sum((1, 2))
    assert grad[0] == 0 and grad[2] == 0 and grad[1] > 0
    assert (x.grad[0, 1] != 0).all()  # one output unit sees every location of its map


def test_channelwise_fc_rejects_other_sizes():
    layer = ChannelWiseFC(8, 6, 6)
    try:
        layer(torch.randn(1, 8, 7, 7))
    except ValueError as e:
        assert "6, 6" in str(e)
    else:
        raise AssertionError("a 7×7 map must be refused")


def test_decoder_reaches_exact_output_size():
    dec = UpConvDecoder(256, (6, 6), (227, 227), [64, 32, 16, 16, 16])
    assert dec.upconv_size == (192, 192)  # five doublings, then a resize to 227
    assert dec(torch.randn(2, 256, 6, 6)).shape == (2, 3, 227, 227)
    ups = [m for m in dec.upconvs if isinstance(m, nn.ConvTranspose2d)]
    relus = [m for m in dec.upconvs if isinstance(m, nn.ReLU)]
    assert len(ups) == len(relus) == 5
    dcgan = UpConvDecoder(100, (1, 1), (64, 64), [64, 32, 16, 16, 8])
    assert dcgan.upconv_size == (64, 64)
    assert dcgan(torch.randn(2, 100, 1, 1)).shape == (2, 3, 64, 64)
