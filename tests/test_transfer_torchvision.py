"""transfer.torchvision_det / torchvision_seg: the run-anywhere detection and segmentation transfer."""

import subprocess
import sys

import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.common import CheckpointError, VOCDetection, VOCSegmentation, load_encoder
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.torchvision_det import load_detector
from transfer.torchvision_det.model import build_faster_rcnn
from transfer.torchvision_det.train import DetectionConfig, evaluate
from transfer.torchvision_det.train import main as det_main
from transfer.torchvision_det.train import run as run_det
from transfer.torchvision_seg import load_segmenter
from transfer.torchvision_seg.model import build_fcn
from transfer.torchvision_seg.train import SegmentationConfig, _PairTransform
from transfer.torchvision_seg.train import evaluate as evaluate_seg
from transfer.torchvision_seg.train import main as seg_main
from transfer.torchvision_seg.train import run as run_seg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    ContextEncoder("resnet18", image_size=64).save_pretrained(root / "ce")
    return root / "ce", make_synthetic_voc(root / "data", num_images=6, size=64)


def _assert_every_tensor_arrived(module_state: dict, prefix: str, encoder_state: dict) -> None:
    carried = {k[len(prefix):]: v for k, v in module_state.items() if k.startswith(prefix)}
    assert carried, f"no tensors under {prefix}"
    for key, value in carried.items():
        assert torch.equal(value, encoder_state[key]), key


@pytest.mark.parametrize("backbone,fpn,stride", [("resnet18", True, None), ("alexnet", False, 16)])
def test_faster_rcnn_carries_the_encoder(backbone, fpn, stride):
    ckpt = load_encoder(f"random:{backbone}", 64)
    model = build_faster_rcnn(ckpt, min_size=160, max_size=200)
    assert (model.backbone.fpn is not None) == fpn
    _assert_every_tensor_arrived(model.state_dict(), "backbone.body.model.", ckpt.state_dict)
    assert model.transform.image_mean == list(ckpt.mean) and model.transform.image_std == list(ckpt.std)
    if stride:
        assert model.backbone.body.strides == [stride]


def test_oracle_detector_scores_full_map(setup):
    _, data = setup
    dataset = VOCDetection(data, 2007, "test", keep_difficult=True)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.targets = iter([dataset[i][1] for i in range(len(dataset))])

        def forward(self, images):
            t = next(self.targets)
            return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}]

    assert evaluate(Oracle(), dataset)["mAP"] == pytest.approx(100.0)


def test_detection_end_to_end_and_the_kept_detector(setup, tmp_path):
    model_dir, data = setup
    result = run_det(DetectionConfig(model=str(model_dir), data_root=str(data), max_steps=2, min_size=64,
                                     max_size=96, num_workers=0, output_dir=str(tmp_path), save_model=True))
    assert result["steps"] == 2 and 0 <= result["mAP"] <= 100 and result["test_images"] == 3
    # --save-model: rebuilt from its folder alone, the detector scores the test images as the run reported
    detector = load_detector(tmp_path / "model")
    again = evaluate(detector, VOCDetection(data, 2007, "test", keep_difficult=True))
    assert again["mAP"] == pytest.approx(result["mAP"], abs=1e-6)  # 0 after 2 steps: the weights say more
    start = load_encoder(model_dir).state_dict
    trained = {k[len("backbone.body.model."):]: v for k, v in detector.state_dict().items()
               if k.startswith("backbone.body.model.")}
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    assert detector.transform.image_mean == list(load_encoder(model_dir).mean)
    assert detector.transform.min_size == (64,) and detector.rpn._post_nms_top_n["testing"] == 1000
    with pytest.raises(CheckpointError, match="not a torchvision-fcn"):
        load_segmenter(tmp_path / "model")


def test_fcn_carries_the_encoder_and_preprocessing(setup):
    ckpt = load_encoder(setup[0])
    model = build_fcn(ckpt).eval()
    _assert_every_tensor_arrived(model.state_dict(), "fcn.backbone.features.model.", ckpt.state_dict)
    assert model(torch.rand(2, 3, 64, 80)).shape == (2, 21, 64, 80)


def test_oracle_segmenter_scores_full_miou(setup):
    _, data = setup
    dataset = VOCSegmentation(data, 2007, "val", transform=_PairTransform(None))

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.masks = iter([dataset[i][1] for i in range(len(dataset))])

        def forward(self, images):
            mask = next(self.masks).clamp(max=20)
            logits = torch.nn.functional.one_hot(mask, 21).permute(2, 0, 1).float()[None]
            return torch.nn.functional.pad(logits, (0, images.shape[-1] - mask.shape[-1],
                                                    0, images.shape[-2] - mask.shape[-2]))

    assert evaluate_seg(Oracle(), dataset)["mIoU"] == pytest.approx(100.0)


def test_segmentation_end_to_end_and_the_kept_segmenter(setup, tmp_path):
    model_dir, data = setup
    result = run_seg(SegmentationConfig(model=str(model_dir), data_root=str(data), year=2007, train_split="train",
                                        test_split="val", max_steps=2, batch_size=2, num_workers=0,
                                        output_dir=str(tmp_path), save_model=True))
    assert result["steps"] == 2 and 0 <= result["mIoU"] <= 100 and result["test_images"] == 3
    segmenter = load_segmenter(tmp_path / "model")
    again = evaluate_seg(segmenter, VOCSegmentation(data, 2007, "val", transform=_PairTransform(None)))
    assert again["mIoU"] == pytest.approx(result["mIoU"], abs=1e-6) and result["mIoU"] > 0
    with pytest.raises(CheckpointError, match="no config.json"):
        load_segmenter(tmp_path)


def test_entry_points_run_from_any_directory_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "transfer.torchvision_seg.train", "--model", "random:resnet18",
                           "--data-root", "nowhere", "--output-dir", "out"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "python -m transfer.torchvision_seg.train: error: --data-root 'nowhere' does not exist\n"


@pytest.mark.parametrize("entry", [det_main, seg_main])
def test_bad_input_found_before_training(setup, tmp_path, capsys, entry):
    model, data = str(setup[0]), str(setup[1])
    split = ["--year", "2007", "--train-split", "train", "--test-split", "val"]
    assert entry(["--model", model, "--data-root", data, *split, "--max-steps", "0",
                  "--output-dir", str(tmp_path / "a")]) == 2
    assert "--max-steps must be at least 1, got 0" in capsys.readouterr().err
    broken = make_synthetic_voc(tmp_path / "voc", num_images=4, size=32)
    ids = (broken / "VOC2007/ImageSets/Segmentation/train.txt").read_text().split()
    (broken / "VOC2007/Annotations" / f"{ids[0]}.xml").unlink()
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (broken / "VOC2007" / folder / f"{ids[0]}.png").unlink(missing_ok=True)
    assert entry(["--model", model, "--data-root", str(broken), *split, "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 ids lack a file" in err and ids[0] in err
    half = tmp_path / "half"  # a model folder whose weights never arrived: refused before the data or the folder
    half.mkdir()
    (half / "config.json").write_text('{"backbone": "resnet18"}')
    assert entry(["--model", str(half), "--data-root", data, *split, "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no model.safetensors" in err and not (tmp_path / "c").exists()
