"""transfer.common: checkpoint loading, feature taps, the VOC layout and the VOC metrics."""

import json

import numpy as np
import pytest
import torch

from ce_pretrain import ContextEncoder
from ce_pretrain.export import save_timm_encoder
from transfer.common import (
    CheckpointError,
    TimmFeatures,
    VOCClassification,
    VOCDetection,
    VOCLayoutError,
    VOCSegmentation,
    choose_taps,
    default_taps,
    load_encoder,
    resolve_voc_dir,
)
from transfer.common.cli import (
    RunInterrupted,
    UsageError,
    add_common_args,
    check_output_dir,
    check_positive,
    claim_output_dir,
    parse_duration,
    run_main,
)
from transfer.common.confusion import ConfusionMatrix
from transfer.common.features import pyramid_taps, single_scale_tap
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.common.voc import holdout_split, parse_annotation, read_split
from transfer.common.voc_ap import classification_ap, detection_ap, voc_ap


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("voc"), num_images=6, size=64)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ce") / "resnet18"
    ContextEncoder("resnet18", image_size=64).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ metrics
def test_voc07_ap_eleven_points():
    # one positive found at rank 2 of 2: precision 0.5 at recall 1 → every threshold sees 0.5
    assert voc_ap(np.array([0.0, 1.0]), np.array([0.0, 0.5])) == pytest.approx(0.5)
    # recall reaches 0.5 with precision 1, never more: thresholds 0..0.5 (6 of 11) score 1
    assert voc_ap(np.array([0.5]), np.array([1.0])) == pytest.approx(6 / 11)
    # area AP of the same curve is 0.5
    assert voc_ap(np.array([0.5]), np.array([1.0]), use_07_metric=False) == pytest.approx(0.5)


def test_detection_ap_hand_case():
    gt = {
        "a": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, True])),
        "b": (np.array([[0, 0, 10, 10]], float), np.array([False])),
        "c": (np.zeros((0, 4)), np.zeros(0, bool)),
    }
    dets = [
        ("a", 0.9, [0, 0, 10, 10]),  # TP
        ("a", 0.8, [0, 0, 10, 9.5]),  # duplicate of a matched box: FP
        ("a", 0.7, [20, 20, 30, 30]),  # on a difficult box: ignored
        ("c", 0.6, [0, 0, 5, 5]),  # image without objects: FP
        ("b", 0.5, [0, 0, 10, 4]),  # IoU 0.4: FP
    ]
    # ranks (ignored one dropped): TP FP FP FP → recall 0.5 at precision 1; never reaches recall > 0.5
    assert detection_ap(dets, gt) == pytest.approx(6 / 11)
    # with the box in b found at the end: recall 1 at precision 2/5
    assert detection_ap(dets + [("b", 0.1, [0, 0, 10, 10])], gt) == pytest.approx((6 * 1 + 5 * 0.4) / 11)
    assert np.isnan(detection_ap(dets, {"c": gt["c"]}))


def test_detection_ap_continuous_iou_matches_devkit_plus_one():
    # devkit boxes (1-based inclusive) [1, 1, 10, 10] and [1, 1, 10, 5]: IoU with "+1" = 50 / 100
    gt = {"x": (np.array([[0, 0, 10, 10]], float), np.array([False]))}
    assert detection_ap([("x", 1.0, [0, 0, 10, 5.01])], gt) == 1.0
    assert detection_ap([("x", 1.0, [0, 0, 10, 5.0])], gt) == 0.0  # exactly 0.5 is not > 0.5


def test_classification_ap_ignores_difficult():
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[1], [0], [-1], [1]])
    # ignoring the difficult one: + - + → precision 1 at recall .5, 2/3 at recall 1
    assert classification_ap(scores, targets)[0] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert np.isnan(classification_ap(scores, -np.ones_like(targets))[0])


def test_confusion_matrix_miou():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 1]])
    cm.update(pred, target)
    # class 0: tp 1, fp 1, fn 1 → 1/3; class 1: tp 3, fp 1 → 3/4; class 2: tp 1, fn 1 → 1/2
    np.testing.assert_allclose(cm.iou(), [1 / 3, 3 / 4, 1 / 2])
    assert np.nanmean(cm.iou()) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([5]), torch.tensor([5]))


# ---------------------------------------------------------------------------------------------- VOC layout
def test_resolve_voc_dir_accepts_the_usual_roots(voc_root):
    voc = voc_root / "VOC2007"
    assert resolve_voc_dir(voc_root, 2007) == voc
    assert resolve_voc_dir(voc_root.parent, 2007) == voc
    assert resolve_voc_dir(voc, 2007) == voc


def test_voc_layout_errors_are_one_line(voc_root, tmp_path):
    for call, match in [(lambda: resolve_voc_dir(tmp_path / "nope", 2007), "does not exist"),
                        (lambda: resolve_voc_dir(voc_root, 2012), "no VOC2012/JPEGImages"),
                        (lambda: read_split(voc_root / "VOC2007", "Main", "nosuch"), "split 'nosuch' not found")]:
        with pytest.raises(VOCLayoutError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_annotation_is_zero_based_continuous(tmp_path):
    xml = ("<annotation><size><width>50</width><height>40</height></size><object><name>dog</name>"
           "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object></annotation>")
    (tmp_path / "a.xml").write_text(xml)
    ann = parse_annotation(tmp_path / "a.xml")
    np.testing.assert_array_equal(ann.boxes, [[0, 1, 10, 20]])
    assert ann.labels.tolist() == [11] and ann.difficult.tolist() == [False] and (ann.width, ann.height) == (50, 40)


def test_datasets_read_the_synthetic_voc(voc_root):
    det = VOCDetection(voc_root, 2007, "trainval", keep_difficult=True)
    image, target = det[0]
    assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape[1] == 4 and target["labels"].min() >= 1
    all_difficult = torch.cat([det[i][1]["difficult"] for i in range(len(det))])
    assert all_difficult.any()  # the fixture marks some objects difficult
    n_kept = sum(len(VOCDetection(voc_root, 2007, "trainval")[i][1]["labels"]) for i in range(len(det)))
    assert n_kept == (~all_difficult).sum()

    cls = VOCClassification(voc_root, 2007, "trainval")
    targets = torch.stack([cls[i][1] for i in range(len(cls))])
    assert set(targets.unique().tolist()) <= {-1, 0, 1} and (targets == 1).any()

    seg = VOCSegmentation(voc_root, 2007, "train")
    image, mask = seg[0]
    values = set(np.unique(np.asarray(mask)).tolist())
    assert image.size == mask.size and 255 in values and values - {0, 255}
    aug = np.asarray(seg.load_mask(seg.ids[0]).copy())
    assert aug.dtype == np.uint8


def test_holdout_split_is_deterministic_and_disjoint():
    ids = [f"{i:04d}" for i in range(50)]
    train, held = holdout_split(ids, 0.2, seed=1)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == ids
    assert holdout_split(list(reversed(ids)), 0.2, seed=1) == (train, held)
    with pytest.raises(UsageError, match="--holdout must be a fraction between 0 and 1, got 1.5"):
        holdout_split(ids, 1.5)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_load_encoder_from_context_encoder_dir(ce_dir):
    ckpt = load_encoder(ce_dir)
    model = ckpt.create_model().eval()
    ce = ContextEncoder.from_pretrained(ce_dir)
    trained = ce.encoder.model.state_dict()
    own = model.state_dict()
    assert trained and all(torch.equal(own[k], v) for k, v in trained.items())
    assert ckpt.image_size == 64 and ckpt.backbone == "resnet18"
    assert ckpt.mean == pytest.approx(tuple(ce.mean.flatten().tolist()))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(ce.encode(x), model.forward_intermediates(
        ce.normalize(x), indices=1, intermediates_only=True)[-1])


def test_load_encoder_from_timm_folder(ce_dir, tmp_path):
    ce = ContextEncoder.from_pretrained(ce_dir)
    save_timm_encoder(ce, tmp_path / "timm")
    a, b = load_encoder(ce_dir), load_encoder(tmp_path / "timm")
    assert a.backbone == b.backbone and a.image_size == b.image_size and a.mean == pytest.approx(b.mean)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_load_encoder_errors(ce_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((ce_dir / "model.safetensors").read_bytes())
    config = json.loads((ce_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "backbone": "resnet34"}))
    with pytest.raises(CheckpointError, match="cannot load ContextEncoder") as err:
        load_encoder(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="unknown backbone"):
        load_encoder("random:resnet_nope")


def test_create_model_is_strict(ce_dir):
    ckpt = load_encoder(ce_dir)
    ckpt.state_dict = {**ckpt.state_dict, "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected \(extra.weight\)"):
        ckpt.create_model()


def test_random_encoder_is_seeded():
    a, b = load_encoder("random:resnet18", 64), load_encoder("random:resnet18", 64)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    c = load_encoder("random:resnet18", 64, seed=1)  # another seed, another initialisation
    assert not torch.equal(a.state_dict["conv1.weight"], c.state_dict["conv1.weight"])


# ------------------------------------------------------------------------------------------------ features
def test_alexnet_single_scale_is_relu5_at_stride_16():
    model = load_encoder("random:alexnet").create_model()
    feats = TimmFeatures(model, default_taps(model, multi_scale=False))
    assert feats.strides == [16] and feats.out_channels == [256]
    assert len(feats.model.features) == 14  # pool5 pruned: conv1..relu5
    assert feats(torch.zeros(1, 3, 227, 227))[0].shape == (1, 256, 13, 13)


def test_resnet_multi_scale_taps():
    model = load_encoder("random:resnet18", 64).create_model()
    feats = TimmFeatures(model, default_taps(model, multi_scale=True))
    assert feats.strides == [4, 8, 16, 32] and feats.out_channels == [64, 128, 256, 512]
    assert [m.shape[-1] for m in feats(torch.zeros(1, 3, 64, 64))] == [16, 8, 4, 2]


@pytest.mark.parametrize("backbone,taps,fpn", [
    ("alexnet", [4], False),                # relu5; pool5 past it has no weights: the paper's single scale
    ("resnet18", [1, 2, 3, 4], True),       # C4 (layer3) would drop layer4's weights: FPN over C2..C5
    ("alexnet_poolfree", [0, 1, 4, 5], True),  # its pool5 is a learned convolution
])
def test_choose_taps_follows_one_rule(backbone, taps, fpn):
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    first = next(model.parameters())
    assert choose_taps(model) == (taps, fpn)
    assert choose_taps(model, fpn=False)[0] == [single_scale_tap(model.feature_info)]
    assert next(model.parameters()) is first and first.device.type == "cpu"  # the rule left the model untouched


def test_single_scale_tap_is_the_deepest_at_stride_16():
    info = [{"reduction": r} for r in (2, 4, 8, 16, 16, 32)]
    assert single_scale_tap(info) == 4
    assert single_scale_tap([{"reduction": 32}, {"reduction": 64}]) == 0
    assert pyramid_taps([{"reduction": r} for r in (2, 4, 8, 8, 16, 32, 64)]) == [3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ cli
@pytest.mark.parametrize("text,seconds", [("90", 90), ("45s", 45), ("20m", 1200), ("1h30m", 5400), ("1.5h", 5400),
                                          ("1h2m3s", 3723)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5d", "0", "m", "-3"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def _parser():
    import argparse

    return add_common_args(argparse.ArgumentParser(prog="tool"), output_dir="runs/x")


def test_common_flags_defaults_and_exit_codes(tmp_path, capsys):
    args = _parser().parse_args(["--model", "m", "--max-time", "1h30m", "--log-with", "csv,tensorboard",
                                 "--resume"])
    assert (args.max_time, args.log_with, args.resume, args.mixed_precision) == (5400, ["csv", "tensorboard"],
                                                                                  "latest", None)
    assert args.output_dir == "runs/x" and args.num_workers == 2 and args.seed == 0 and not args.overwrite

    def bad(args):
        raise UsageError("--thing is wrong\nsecond line never shown")

    assert run_main(_parser(), bad, ["--model", "m"]) == 2
    assert capsys.readouterr().err == "tool: error: --thing is wrong\n"

    def stopped(args):
        raise RunInterrupted("stopped; resume with --resume", 143)

    assert run_main(_parser(), stopped, ["--model", "m"]) == 143
    assert run_main(_parser(), lambda a: None, ["--model", "m"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        run_main(_parser(), lambda a: None, ["--model", "m", "--mixed-precision", "fp8"])
    assert exit_info.value.code == 2


def test_claim_output_dir_locks_and_overwrite_deletes_only_the_earlier_run(tmp_path, monkeypatch):
    from ce_pretrain.checkpoint import LOCK_NAME

    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000099").mkdir(parents=True)  # a longer earlier run: resume would pick it up
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own")
    with pytest.raises(UsageError, match="holds an earlier run"):
        with claim_output_dir(out):
            pass
    with claim_output_dir(out, overwrite=True) as claimed:
        assert claimed == out and (out / LOCK_NAME).is_file()
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt"]
        with pytest.raises(UsageError, match="another run"), claim_output_dir(out):
            pass
    assert not (out / LOCK_NAME).exists()
    with claim_output_dir(out, resume=True):  # resume keeps what is there
        assert (out / "notes.txt").exists()
    (out / "model_0000009.pth").write_bytes(b"")
    with pytest.raises(UsageError, match=r"model_\*\.pth"), claim_output_dir(out, markers=("model_*.pth",)):
        pass
    monkeypatch.setenv("RANK", "1")  # a launched worker: the main process holds the claim
    with claim_output_dir(out, resume=True):
        assert not (out / LOCK_NAME).exists()


def test_check_output_dir(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and not list(out.iterdir())
    (out / "results.json").write_text("{}")
    with pytest.raises(UsageError, match="holds an earlier run"):
        check_output_dir(out)
    assert check_output_dir(out, resume=True) == out and check_output_dir(out, overwrite=True) == out
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(UsageError, match="not writable"):  # under a file: refused even for root
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(UsageError, match="--max-steps must be at least 1, got 0"):
        check_positive(batch_size=2, max_steps=0)
