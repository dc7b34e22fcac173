import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ce_pretrain import ContextEncoder, IncompatibleCheckpointError, make_masks

ARGS = dict(backbone="resnet18", image_size=64, pred_size=32, overlap=4, bottleneck="fc", bottleneck_dim=64,
            dropout=0.3, decoder_channels=[32, 16, 16, 8], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = ContextEncoder(**ARGS)
    with torch.no_grad():  # move away from the initialisation so a fresh model would differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.train()(torch.rand(4, 3, 64, 64), make_masks("center", 4, 64, 64, overlap=4))  # update BN stats
    model.save_pretrained(tmp_path / "ckpt")
    return model.eval(), tmp_path / "ckpt"


def test_save_writes_config_with_every_argument(trained):
    _, path = trained
    assert (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    for key, value in ARGS.items():
        assert config[key] == value, key
    for key in ("pretrained_backbone", "backbone_kwargs"):
        assert key in config


def test_round_trip_is_bit_exact(trained):
    model, path = trained
    loaded = ContextEncoder.from_pretrained(str(path))
    assert not loaded.training
    own, new = model.state_dict(), loaded.state_dict()
    assert own.keys() == new.keys()
    assert all(torch.equal(own[k], new[k]) for k in own)
    x = torch.rand(2, 3, 64, 64)
    mask = make_masks("center", 2, 64, 64, overlap=4)
    with torch.no_grad():
        assert torch.equal(model(x, mask), loaded(x, mask))


def test_other_architecture_is_refused(trained, tmp_path):
    _, path = trained
    config = json.loads((path / "config.json").read_text())
    config["backbone"] = "resnet34"  # same family, more blocks: a silent partial load would be easy
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleCheckpointError, match="missing"):
        ContextEncoder.from_pretrained(str(path))


def test_mis_shaped_and_extra_tensors_are_refused(trained):
    _, path = trained
    state = load_file(path / "model.safetensors")
    state["bottleneck.1.weight"] = torch.ones(7)
    state["something.extra"] = torch.ones(1)
    save_file(state, path / "model.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="unexpected.*another shape"):
        ContextEncoder.from_pretrained(str(path))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    ContextEncoder(**ARGS).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ContextEncoder.from_pretrained(str(tmp_path / "c"))


def test_unknown_repo_offline_fails_without_network():
    with pytest.raises(Exception) as info:
        ContextEncoder.from_pretrained("nobody/no-such-context-encoder")
    assert "offline" in str(info.value).lower() or "cannot find" in str(info.value).lower()


def test_config_is_public_and_rebuilds_the_architecture(trained):
    model, path = trained
    assert ContextEncoder(**model.config).state_dict().keys() == model.state_dict().keys()
    assert json.loads((path / "config.json").read_text())["backbone"] == model.config["backbone"]


def test_mask_rule_travels_with_the_model(tmp_path):
    model = ContextEncoder(backbone="resnet18", image_size=64, mask="random-block")
    model.save_pretrained(tmp_path / "m")
    loaded = ContextEncoder.from_pretrained(str(tmp_path / "m"))
    assert loaded.mask_rule.kind == "random-block"
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(model.mask_rule.sample(4, g1), loaded.mask_rule.sample(4, g2))
    # no mask in the config (older models): centre holes for a centre prediction, random regions otherwise
    centre = ContextEncoder(backbone="dcgan_encoder", image_size=128, pred_size=64, overlap=7, bottleneck="fc")
    assert (centre.mask_rule.kind, centre.mask_rule.overlap) == ("center", 7)
    assert ContextEncoder(backbone="resnet18", image_size=64).mask_rule.kind == "random-region"
    with pytest.raises(ValueError, match="mask must be one of"):
        ContextEncoder(backbone="resnet18", image_size=64, mask="squares")


def test_strict_loader_names_every_problem():
    from torch import nn

    from ce_pretrain.weights import load_state_dict_strict

    layer = nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(IncompatibleCheckpointError, match=r"1 missing \(bias\); 1 unexpected \(extra\); 1 of another"):
        load_state_dict_strict(layer, state, "test state")
    load_state_dict_strict(layer, {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, "ok")
    assert torch.equal(layer.weight, torch.ones(2, 3))
