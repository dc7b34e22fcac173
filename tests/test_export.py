"""The encoder exported in timm's Hub layout loads with timm's own entry points, bit-exact."""

import json
import shutil

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import load_file

import ce_pretrain  # noqa: F401  (registers the paper's encoders in timm)
from ce_pretrain import ContextEncoder, make_masks
from ce_pretrain.export import save_timm_encoder


def trained(backbone: str, image_size: int, **kwargs) -> ContextEncoder:
    torch.manual_seed(0)
    model = ContextEncoder(backbone, image_size=image_size, **kwargs)
    with torch.no_grad():  # move away from the initialisation, so fresh weights would not pass for the trained ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.train()(torch.rand(2, 3, image_size, image_size), make_masks("center", 2, image_size, image_size))
    return model.eval()


def assert_same_encoder(model: ContextEncoder, timm_model: torch.nn.Module, reinitialized: list[str]) -> None:
    own, loaded = model.encoder.model.state_dict(), timm_model.state_dict()
    assert set(own) <= set(loaded)
    assert set(loaded) - set(own) == set(reinitialized)
    for key, value in own.items():
        assert torch.equal(value, loaded[key]), key  # bit-exact, buffers (BN statistics) included


@pytest.fixture(scope="module", params=["resnet18", "dcgan_encoder"])
def exported(request, tmp_path_factory):
    model = trained(request.param, 64, **({"backbone_kwargs": dict(width=8)} if request.param == "dcgan_encoder"
                                          else {}))
    out = save_timm_encoder(model, tmp_path_factory.mktemp("export") / "encoder")
    return model, out


def test_layout_is_timms(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == model.backbone_name
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["mean"] == pytest.approx(model.mean.flatten().tolist())


def test_local_dir_loads_bit_exact(exported):
    model, out = exported
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert timm_model.num_classes == 0
    reinitialized = json.loads((out / "config.json").read_text())["ce_pretrain"]["reinitialized"]
    assert_same_encoder(model, timm_model, reinitialized)
    x = model.normalize(torch.rand(2, 3, 64, 64))  # timm models take normalised input (mean/std in pretrained_cfg)
    with torch.no_grad():
        assert torch.equal(timm_model.forward_features(x), model.encoder(x))
    assert tuple(timm.data.resolve_data_config({}, model=timm_model)["input_size"]) == (3, 64, 64)


def test_pretrained_cfg_overlay_file_loads_bit_exact(exported):
    model, out = exported
    kwargs = {"width": 8} if model.backbone_name == "dcgan_encoder" else {}
    overlay = dict(file=str(out / "model.safetensors"), num_classes=0)
    timm_model = timm.create_model(model.backbone_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    assert_same_encoder(model, timm_model, [])


def test_fresh_classifier_for_transfer(exported):
    model, out = exported
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=20)
    assert timm_model.get_classifier().out_features == 20
    own, loaded = model.encoder.model.state_dict(), timm_model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in own.items())


def test_hf_hub_loads_bit_exact(exported, tmp_path, monkeypatch):
    """``hf-hub:<repo>``, served from a Hub cache laid out as a download would leave it (tests stay offline)."""
    model, out = exported
    commit = "0" * 40
    repo = tmp_path / "models--someone--ce-encoder"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out / name, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    timm_model = timm.create_model("hf-hub:someone/ce-encoder", pretrained=True)
    assert_same_encoder(model, timm_model, [])


def test_untrained_layers_are_listed_and_freshly_initialised(tmp_path):
    """AlexNet's fc6/fc7 follow pool5, which the context encoder never trains: exported fresh and listed (§5.2)."""
    model = trained("alexnet", 99)
    out = save_timm_encoder(model, tmp_path / "alexnet")
    reinitialized = json.loads((out / "config.json").read_text())["ce_pretrain"]["reinitialized"]
    assert reinitialized and all(k.startswith("pre_logits.") for k in reinitialized)
    assert set(load_file(out / "model.safetensors")) >= set(model.encoder.model.state_dict())
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=20)
    own, loaded = model.encoder.model.state_dict(), timm_model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in own.items())
