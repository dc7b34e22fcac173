"""transfer.detectron2: the converter and proposal converter everywhere; the real detectron2 where importable."""

import pickle

import numpy as np
import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.common import VOC_CLASSES, load_encoder
from transfer.common.features import TimmFeatures, default_taps
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.detectron2.convert import convert, input_config
from transfer.detectron2.keys import BACKBONE_PREFIX, FPN_BACKBONE_PREFIX
from transfer.detectron2.proposals import convert_selective_search


@pytest.fixture(scope="module")
def ce_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2ce")
    torch.manual_seed(0)
    ContextEncoder("resnet18", image_size=64).save_pretrained(root / "resnet18")
    ContextEncoder("alexnet", image_size=131).save_pretrained(root / "alexnet")
    return root


@pytest.mark.parametrize("backbone,fpn,prefix", [("alexnet", False, BACKBONE_PREFIX),
                                                 ("resnet18", True, FPN_BACKBONE_PREFIX)])
def test_convert_writes_exactly_the_pruned_backbone(ce_dirs, tmp_path, backbone, fpn, prefix):
    ckpt = load_encoder(ce_dirs / backbone)
    weights, config = convert(ce_dirs / backbone, tmp_path / "out")
    state = torch.load(weights, weights_only=True)["model"]
    model = ckpt.create_model()
    expected = TimmFeatures(model, default_taps(model, fpn)).model.state_dict()
    assert set(state) == {prefix + k for k in expected}
    assert all(torch.equal(state[prefix + k], ckpt.state_dict[k]) for k in expected)
    text = config.read_text()
    assert 'FORMAT: "RGB"' in text and str(weights.resolve()) in text
    assert ("build_timm_fpn_backbone" in text) == fpn
    assert input_config(ckpt)["MODEL.PIXEL_MEAN"] == pytest.approx([m * 255 for m in ckpt.mean], abs=1e-3)


def test_selective_search_conversion(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy reads the .mat proposal files")
    images = np.array(["000001", "000002"], dtype=object)
    boxes = np.empty(2, dtype=object)
    boxes[0] = np.array([[1, 2, 10, 20], [5, 5, 6, 6]], np.float64)  # y1 x1 y2 x2, 1-based
    boxes[1] = np.array([[3, 4, 30, 40]], np.float64)
    scipy_io.savemat(tmp_path / "ss.mat", {"images": images[:, None], "boxes": boxes[None, :]})
    assert convert_selective_search(tmp_path / "ss.mat", tmp_path / "ss.pkl") == 2
    data = pickle.loads((tmp_path / "ss.pkl").read_bytes())
    assert data["ids"] == ["000001", "000002"] and data["bbox_mode"] == 0
    np.testing.assert_array_equal(data["boxes"][0], [[1, 0, 20, 10], [4, 4, 6, 6]])
    assert data["objectness_logits"][0][0] > data["objectness_logits"][0][1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_selective_search(tmp_path / "none.mat", tmp_path / "x.pkl")


# ------------------------------------------------------------------------------------ the real detectron2
@pytest.fixture(scope="module")
def d2_voc(tmp_path_factory):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (it builds from source; see README)")
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("d2voc")
    devkit = make_synthetic_voc(root, num_images=40, size=64, classes=VOC_CLASSES)
    from transfer.common import VOCDetection

    rng = np.random.default_rng(0)
    for split in ("trainval", "test"):
        data = VOCDetection(devkit, 2007, split, keep_difficult=True)
        images = np.array(data.ids, dtype=object)[:, None]
        boxes = np.empty((1, len(data)), dtype=object)
        for i in range(len(data)):
            gt = data[i][1]["boxes"].numpy()
            jitter = np.concatenate([gt + rng.normal(0, 2, gt.shape), rng.uniform(0, 60, (20, 4))])
            x0, x1 = np.minimum(jitter[:, 0], jitter[:, 2]), np.maximum(jitter[:, 0], jitter[:, 2]) + 2
            y0, y1 = np.minimum(jitter[:, 1], jitter[:, 3]), np.maximum(jitter[:, 1], jitter[:, 3]) + 2
            boxes[0, i] = np.stack([y0 + 1, x0 + 1, y1, x1], 1).round()
        savemat(root / f"voc_2007_{split}.mat", {"images": images, "boxes": boxes})
        convert_selective_search(root / f"voc_2007_{split}.mat", root / f"voc_2007_{split}.pkl")
    return devkit, root


def _args(config: str, model, data_root, out, proposals=None, extra=()):
    from transfer.detectron2.train_net import CONFIG_DIR, parse_args

    argv = ["--config-file", str(CONFIG_DIR / config), "--model", str(model), "--data-root", str(data_root)]
    argv += ["--proposals-dir", str(proposals)] if proposals else []
    return parse_args(argv + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2",
                              "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(128,)",
                              "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MAX_SIZE_TEST",
                              "160", "SOLVER.WARMUP_ITERS", "1", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
                              "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", "50",
                              *extra])


@pytest.mark.parametrize("config,backbone,proposals", [
    ("fast_rcnn_alexnet_voc07.yaml", "alexnet", True),
    ("faster_rcnn_alexnet_voc07.yaml", "alexnet", False),
    ("faster_rcnn_fpn_timm_voc07.yaml", "resnet18", False),
])
def test_detectron2_model_gets_every_tensor(ce_dirs, d2_voc, tmp_path, config, backbone, proposals):
    from transfer.detectron2.train_net import Trainer, setup

    devkit, root = d2_voc
    cfg = setup(_args(config, ce_dirs / backbone, devkit, tmp_path, root if proposals else None))
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.TIMM.NAME == backbone
    model = Trainer.build_model(cfg)  # raises unless the backbone keys land exactly
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    ckpt = load_encoder(ce_dirs / backbone)
    prefix = FPN_BACKBONE_PREFIX if "fpn" in config else BACKBONE_PREFIX
    carried = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    assert carried and all(torch.equal(v, ckpt.state_dict[k]) for k, v in carried.items())
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(ckpt.mean) * 255, atol=1e-3, rtol=0)


@pytest.mark.parametrize("config,backbone,proposals", [
    ("fast_rcnn_alexnet_voc07.yaml", "alexnet", True),
    pytest.param("faster_rcnn_fpn_timm_voc07.yaml", "resnet18", False, marks=pytest.mark.slow),
])
def test_detectron2_train_step_and_voc_evaluation(ce_dirs, d2_voc, tmp_path, config, backbone, proposals):
    from transfer.detectron2.train_net import run

    devkit, root = d2_voc
    args = _args(config, ce_dirs / backbone, devkit, tmp_path, root if proposals else None)
    results = run(args)
    assert "AP50" in results["bbox"] and 0 <= results["bbox"]["AP50"] <= 100
    assert (tmp_path / "model_final.pth").is_file()
    args.eval_only = True
    assert "AP50" in run(args)["bbox"]
