"""transfer.mmseg: the converter everywhere; the real mmsegmentation (with compiled mmcv) where importable."""

import argparse

import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.common import load_encoder
from transfer.common.features import TimmFeatures
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.mmseg.convert import BACKBONE_PREFIX, convert


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mmce") / "alexnet"
    torch.manual_seed(0)
    ContextEncoder("alexnet", image_size=131).save_pretrained(path)
    return path


def test_convert_writes_exactly_the_pruned_backbone(ce_dir, tmp_path):
    ckpt = load_encoder(ce_dir)
    data = torch.load(convert(ce_dir, tmp_path / "w.pth"), weights_only=True)
    model = ckpt.create_model()
    expected = TimmFeatures(model, [len(model.feature_info) - 1]).model.state_dict()
    assert set(data["state_dict"]) == {BACKBONE_PREFIX + k for k in expected}
    assert all(torch.equal(data["state_dict"][BACKBONE_PREFIX + k], ckpt.state_dict[k]) for k in expected)
    assert data["meta"]["mean"] == pytest.approx([m * 255 for m in ckpt.mean])


@pytest.fixture(scope="module")
def mm_args(ce_dir, tmp_path_factory):
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    try:
        import mmcv.ops  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        pytest.skip("mmseg needs mmcv with compiled ops (mmcv-lite lacks the ops mmseg imports)")
    root = tmp_path_factory.mktemp("mmvoc")
    devkit = make_synthetic_voc(root, num_images=8, size=64, year=2012)
    return argparse.Namespace(model=str(ce_dir), data_root=str(devkit), config=None, work_dir=str(root / "work"),
                              crop_size=131, max_iters=1, cfg_options={
                                  "train_dataloader.batch_size": 2, "train_dataloader.num_workers": 0,
                                  "train_dataloader.persistent_workers": False, "val_dataloader.num_workers": 0,
                                  "val_dataloader.persistent_workers": False, "test_dataloader.num_workers": 0,
                                  "test_dataloader.persistent_workers": False})


def test_mmseg_segmentor_gets_every_tensor(mm_args, ce_dir):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from transfer.mmseg.train import CONFIG, build_config

    register_all_modules()
    mm_args.config = str(CONFIG)
    cfg = build_config(mm_args)
    segmentor = MODELS.build(cfg.model)
    segmentor.init_weights()
    ckpt = load_encoder(ce_dir)
    carried = {k[len(BACKBONE_PREFIX):]: v for k, v in segmentor.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    assert carried and all(torch.equal(v, ckpt.state_dict[k]) for k, v in carried.items())
    weights = torch.load(cfg.model.backbone.checkpoint, weights_only=True)["state_dict"]
    missing, unexpected = segmentor.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
    assert segmentor.data_preprocessor.mean.flatten().tolist() == pytest.approx([m * 255 for m in ckpt.mean])


def test_mmseg_train_step_and_iou_metric(mm_args):
    from transfer.mmseg.train import CONFIG, run

    mm_args.config = str(CONFIG)
    metrics = run(mm_args)
    assert "mIoU" in metrics and 0 <= metrics["mIoU"] <= 100
