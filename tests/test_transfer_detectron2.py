"""transfer.detectron2: the converter and proposal converter everywhere; the real detectron2 where importable."""

import pickle
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.common import VOC_CLASSES, CheckpointError, load_encoder
from transfer.common.features import TimmFeatures, default_taps
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.common.voc import VOCLayoutError
from transfer.detectron2.convert import convert, input_config
from transfer.detectron2.datasets import OPTIONAL_FIELDS, plan_splits, write_split_view
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


def test_proposals_missing_output_folder_is_named_as_output(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy reads the .mat proposal files")
    scipy_io.savemat(tmp_path / "ss.mat", {"images": np.array(["000001"], dtype=object)[:, None],
                                           "boxes": np.array([np.ones((1, 4))], dtype=object)[None, :]})
    with pytest.raises(FileNotFoundError, match="output folder .*nope"):
        convert_selective_search(tmp_path / "ss.mat", tmp_path / "nope" / "ss.pkl")


@pytest.mark.parametrize("argv", [["missing.mat", "out.pkl"], ["{mat}", "{tmp}/nope/out.pkl"]])
def test_proposals_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy reads the .mat proposal files")
    scipy_io.savemat(tmp_path / "ss.mat", {"images": np.array(["000001"], dtype=object)[:, None],
                                           "boxes": np.array([np.ones((1, 4))], dtype=object)[None, :]})
    from transfer.detectron2.proposals import main

    assert main([a.format(mat=tmp_path / "ss.mat", tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m transfer.detectron2.proposals: error: ") and err.count("\n") == 1
    assert ("output folder" in err) == ("nope" in argv[1])


def test_convert_cli_bad_model_is_one_line_exit_2(tmp_path, capsys):
    from transfer.detectron2.convert import main

    assert main(["--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m transfer.detectron2.convert: error: ") and err.count("\n") == 1


def test_train_net_without_detectron2_is_one_line_exit_2():
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed: the command runs")
    done = subprocess.run([sys.executable, "-m", "transfer.detectron2.train_net", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "detectron2" in done.stderr


def _strip_optional_fields(voc):
    """Annotations as the shared VOC2012 subset has them: no pose, truncated or difficult."""
    for xml in (voc / "Annotations").glob("*.xml"):
        text = xml.read_text()
        for field in OPTIONAL_FIELDS:
            text = re.sub(f"<{field}>[^<]*</{field}>", "", text)
        xml.write_text(text)


def test_split_view_fills_optional_fields_and_keeps_the_source(tmp_path):
    voc = make_synthetic_voc(tmp_path, num_images=6, size=48) / "VOC2007"
    _strip_optional_fields(voc)
    before = {p.name: p.read_text() for p in (voc / "Annotations").glob("*.xml")}
    _, test = plan_splits(voc, 2007, ["trainval"], ["test"])
    folder = write_split_view(voc, test[0], tmp_path / "views")
    assert test[0].name == "ce_voc_2007_test" and folder.name == test[0].name
    assert (folder / "ImageSets" / "Main" / f"{test[0].name}.txt").read_text().split() == list(test[0].ids)
    assert (folder / "JPEGImages" / f"{test[0].ids[0]}.jpg").is_file()
    for image_id in test[0].ids:
        # what detectron2's evaluator reads: obj.find("pose").text, int(truncated), int(difficult)
        for obj in ET.parse(folder / "Annotations" / f"{image_id}.xml").getroot().findall("object"):
            assert obj.find("pose").text == "Unspecified"
            assert int(obj.find("truncated").text) == 0 and int(obj.find("difficult").text) == 0
    assert {p.name: p.read_text() for p in (voc / "Annotations").glob("*.xml")} == before
    write_split_view(voc, test[0], tmp_path / "views")  # a second run over the same folder


def test_split_view_keeps_given_difficult_flags(tmp_path):
    voc = make_synthetic_voc(tmp_path, num_images=8, size=48) / "VOC2007"
    spec = plan_splits(voc, 2007, ["trainval"], ["test"])[0][0]
    folder = write_split_view(voc, spec, tmp_path / "views")
    flags = [[o.findtext("difficult") for o in ET.parse(p).getroot().findall("object")]
             for p in sorted((voc / "Annotations").glob("*.xml"))]
    copied = [[o.findtext("difficult") for o in ET.parse(p).getroot().findall("object")]
              for p in sorted((folder / "Annotations").glob("*.xml"))]
    assert copied == flags and "1" in sum(flags, [])


def test_holdout_splits_the_training_split(tmp_path):
    voc = make_synthetic_voc(tmp_path, num_images=20, size=48) / "VOC2007"
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    train, test = plan_splits(voc, 2007, ["trainval"], ["test"], holdout=0.25, seed=3)
    assert [s.source_split for s in (*train, *test)] == ["trainval", "trainval"]
    assert len(test[0].ids) == 5 and not set(test[0].ids) & set(train[0].ids)
    assert sorted(train[0].ids + test[0].ids) == sorted((voc / "ImageSets/Main/trainval.txt").read_text().split())
    assert plan_splits(voc, 2007, ["trainval"], [], holdout=0.25, seed=3) == (train, test)
    with pytest.raises(VOCLayoutError, match="not found"):
        plan_splits(voc, 2007, ["trainval"], ["test"])
    with pytest.raises(VOCLayoutError, match="one training split"):
        plan_splits(voc, 2007, ["train", "val"], [], holdout=0.25)
    with pytest.raises(VOCLayoutError, match="at least 2"):
        plan_splits(voc, 2007, ["trainval"], [], holdout=0.01)


def test_split_view_names_a_missing_image_or_bad_annotation(tmp_path):
    voc = make_synthetic_voc(tmp_path, num_images=6, size=48) / "VOC2007"
    spec = plan_splits(voc, 2007, ["trainval"], ["test"])[1][0]
    xml = voc / "Annotations" / f"{spec.ids[0]}.xml"
    original = xml.read_text()
    xml.write_text("<annotation><object><name>unicorn</name></object>")
    with pytest.raises(VOCLayoutError, match="not valid XML"):
        write_split_view(voc, spec, tmp_path / "views")
    xml.write_text(original.replace("<name>", "<name>x"))
    with pytest.raises(VOCLayoutError, match="unknown class 'x"):
        write_split_view(voc, spec, tmp_path / "views")
    xml.write_text(original)
    (voc / "JPEGImages" / f"{spec.ids[1]}.jpg").unlink()
    with pytest.raises(VOCLayoutError, match=f"{spec.ids[1]}.*missing"):
        write_split_view(voc, spec, tmp_path / "views")


# ------------------------------------------------------------------------------------ the real detectron2
def _write_proposals(devkit, root, year=2007):
    """Selective-search-like ``.mat`` files (jittered ground truth plus random boxes), converted to detectron2's."""
    from scipy.io import savemat

    from transfer.common import VOCDetection

    rng = np.random.default_rng(0)
    for split in ("trainval", "test"):
        data = VOCDetection(devkit, year, split, keep_difficult=True)
        images = np.array(data.ids, dtype=object)[:, None]
        boxes = np.empty((1, len(data)), dtype=object)
        for i in range(len(data)):
            gt = data[i][1]["boxes"].numpy()
            jitter = np.concatenate([gt + rng.normal(0, 2, gt.shape), rng.uniform(0, 60, (20, 4))])
            x0, x1 = np.minimum(jitter[:, 0], jitter[:, 2]), np.maximum(jitter[:, 0], jitter[:, 2]) + 2
            y0, y1 = np.minimum(jitter[:, 1], jitter[:, 3]), np.maximum(jitter[:, 1], jitter[:, 3]) + 2
            boxes[0, i] = np.stack([y0 + 1, x0 + 1, y1, x1], 1).round()
        savemat(root / f"voc_{year}_{split}.mat", {"images": images, "boxes": boxes})
        convert_selective_search(root / f"voc_{year}_{split}.mat", root / f"voc_{year}_{split}.pkl")


@pytest.fixture(scope="module")
def d2_voc(tmp_path_factory):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (builds from source: docs/transfer.md)")
    root = tmp_path_factory.mktemp("d2voc")
    devkit = make_synthetic_voc(root, num_images=40, size=64, classes=VOC_CLASSES)
    _write_proposals(devkit, root)
    return devkit, root


SMALL = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MAX_SIZE_TEST", "160", "SOLVER.WARMUP_ITERS", "1",
         "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
         "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", "50"]


def _argv(config: str, model, data_root, out, proposals=None, iters=1, extra=()):
    from transfer.detectron2.train_net import CONFIG_DIR

    argv = ["--config-file", str(CONFIG_DIR / config), "--model", str(model), "--data-root", str(data_root),
            "--output-dir", str(out), "--num-workers", "0"]
    argv += ["--proposals-dir", str(proposals)] if proposals else []
    return argv + [*extra, *SMALL, "SOLVER.MAX_ITER", str(iters)]


def _args(*a, **k):
    from transfer.detectron2.train_net import parse_args

    return parse_args(_argv(*a, **k))


@pytest.mark.parametrize("config,backbone,proposals", [
    ("fast_rcnn_alexnet_voc07.yaml", "alexnet", True),
    ("faster_rcnn_alexnet_voc07.yaml", "alexnet", False),
    ("faster_rcnn_fpn_timm_voc07.yaml", "resnet18", False),
])
def test_detectron2_model_gets_every_tensor(ce_dirs, d2_voc, tmp_path, config, backbone, proposals):
    from transfer.detectron2.train_net import Trainer, check_encoder_fits, setup

    devkit, root = d2_voc
    cfg = setup(_args(config, ce_dirs / backbone, devkit, tmp_path, root if proposals else None))
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.TIMM.NAME == backbone
    model = Trainer.build_model(cfg)
    check_encoder_fits(model, cfg.MODEL.WEIGHTS)  # raises unless the backbone keys land exactly
    ckpt = load_encoder(ce_dirs / backbone)
    prefix = FPN_BACKBONE_PREFIX if "fpn" in config else BACKBONE_PREFIX
    carried = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    assert carried and all(torch.equal(v, ckpt.state_dict[k]) for k, v in carried.items())
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(ckpt.mean) * 255, atol=1e-3, rtol=0)


def test_detectron2_refuses_an_encoder_that_does_not_fit(ce_dirs, d2_voc, tmp_path):
    from transfer.detectron2.train_net import Trainer, check_encoder_fits, setup

    devkit, root = d2_voc
    cfg = setup(_args("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root))
    model = Trainer.build_model(cfg)
    state = torch.load(cfg.MODEL.WEIGHTS, weights_only=True)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        check_encoder_fits(model, str(tmp_path / "partial.pth"))


def test_command_line_test_dataset_is_honoured(ce_dirs, d2_voc, tmp_path):
    from transfer.detectron2.train_net import setup

    devkit, root = d2_voc
    cfg = setup(_args("faster_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path,
                      extra=["DATASETS.TEST", "('voc_2007_trainval',)"]))
    assert cfg.DATASETS.TRAIN == ("ce_voc_2007_trainval",) and cfg.DATASETS.TEST == ("ce_voc_2007_trainval",)
    from detectron2.data import DatasetCatalog

    assert len(DatasetCatalog.get("ce_voc_2007_trainval")) == 40


def _count_evaluations(monkeypatch) -> list:
    """Spy on detectron2's VOC evaluator: the real ``evaluate`` runs; each call's dataset and result are recorded."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    calls, evaluate = [], PascalVOCDetectionEvaluator.evaluate

    def counted(self):
        result = evaluate(self)
        calls.append((self._dataset_name, result))
        return result

    monkeypatch.setattr(PascalVOCDetectionEvaluator, "evaluate", counted)
    return calls


def _result_lines(out: str) -> list[str]:
    """What train_net prints (detectron2's own log lines go to stdout too, with timestamps)."""
    return [line for line in out.splitlines() if line.startswith("bbox AP")]


def test_eval_only_without_a_trained_detector_stops(ce_dirs, d2_voc, tmp_path, capsys):
    from transfer.detectron2.train_net import main

    devkit, root = d2_voc
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root)
    assert main(["--eval-only", *argv]) == 2  # it used to score the bare encoder's untrained detector
    assert "no trained detector" in capsys.readouterr().err
    assert main(["--eval-only", *argv, "MODEL.WEIGHTS", str(tmp_path / "none.pth")]) == 2
    assert "none.pth" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_only_scores_the_trained_detector_once(ce_dirs, tmp_path_factory, tmp_path, monkeypatch, capsys):
    """~1-5 min on CPU: 80 Fast R-CNN steps, three evaluations."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (builds from source: docs/transfer.md)")
    from transfer.detectron2.train_net import Trainer, check_encoder_fits, main, parse_args, setup

    root = tmp_path_factory.mktemp("d2easy")
    devkit = make_synthetic_voc(root, num_images=24, size=64)  # four classes, a dozen instances each
    _write_proposals(devkit, root)
    # every detection is scored (an untrained head's ~1/21 softmax falls below detectron2's 0.05 threshold)
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root, iters=80,
                 extra=["SOLVER.BASE_LR", "0.01", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    calls = _count_evaluations(monkeypatch)
    assert main(argv) == 0
    trained = _result_lines(capsys.readouterr().out)
    assert [name for name, _ in calls] == ["ce_voc_2007_test"] and len(trained) == 1
    assert (tmp_path / "model_final.pth").is_file()
    assert main(["--eval-only", *argv]) == 0
    assert _result_lines(capsys.readouterr().out) == trained and len(calls) == 2
    assert calls[1][1] == calls[0][1]

    cfg = setup(parse_args(argv))
    untrained = Trainer.build_model(cfg)
    check_encoder_fits(untrained, cfg.MODEL.WEIGHTS)
    ap_untrained = Trainer.test(cfg, untrained)["bbox"]["AP50"]
    ap_trained = calls[0][1]["bbox"]["AP50"]
    assert ap_trained > ap_untrained + 2, (ap_trained, ap_untrained)


def test_holdout_and_annotations_without_optional_fields(ce_dirs, tmp_path_factory, tmp_path, capsys):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (builds from source: docs/transfer.md)")
    from transfer.detectron2.train_net import main

    devkit = make_synthetic_voc(tmp_path_factory.mktemp("subset"), num_images=12, size=64, year=2012)
    voc = devkit / "VOC2012"
    _strip_optional_fields(voc)  # as in the real VOC2012 subset: the evaluator used to crash on these
    for split in ("train", "val", "test"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").unlink()
    assert main(_argv("faster_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path,
                      extra=["--year", "2012", "--holdout", "0.25"])) == 0
    assert len(_result_lines(capsys.readouterr().out)) == 1
    held = (tmp_path / "datasets" / "ce_voc_2012_trainval_holdout" / "ImageSets" / "Main" /
            "ce_voc_2012_trainval_holdout.txt").read_text().split()
    assert len(held) == 3


@pytest.mark.parametrize("extra,message", [
    (["--holdout", "1.5"], "--holdout"),
    (["DATASETS.TEST", "('voc_2007_nosuchsplit',)"], "nosuchsplit"),
    (["MODEL.NO_SUCH_KEY", "1"], "NO_SUCH_KEY"),
    (["--mixed-precision", "fp16"], "cuda"),
    (["--num-gpus", "2"], "cuda"),  # detectron2's DDP wrapper pins each process to a GPU
])
def test_bad_input_is_one_line_exit_2(ce_dirs, d2_voc, tmp_path, capsys, extra, message):
    from transfer.detectron2.train_net import main

    devkit, root = d2_voc
    assert main(_argv("faster_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, extra=extra)) == 2
    # detectron2's cached log handlers may still point at an earlier test's closed capture and report that on
    # stderr ("--- Logging error ---"); the run's own report is its one line
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m transfer.")]
    assert len(ours) == 1 and ours[0].startswith("python -m transfer.detectron2.train_net: error: ")
    assert message in ours[0]


@pytest.mark.slow
def test_faster_rcnn_fpn_train_and_voc_evaluation(ce_dirs, d2_voc, tmp_path):
    from transfer.detectron2.train_net import parse_args, run

    devkit, _ = d2_voc
    results = run(parse_args(_argv("faster_rcnn_fpn_timm_voc07.yaml", ce_dirs / "resnet18", devkit, tmp_path)))
    assert 0 <= results["bbox"]["AP50"] <= 100 and (tmp_path / "model_final.pth").is_file()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="detectron2's DDP wrapper needs one GPU per process")
def test_two_processes_through_detectron2_launch(ce_dirs, d2_voc, tmp_path):
    """``--num-gpus 2``: detectron2's launch starts two processes; one result line is printed."""
    import subprocess
    import sys

    devkit, root = d2_voc
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root, iters=2,
                 extra=["--num-gpus", "2"])
    done = subprocess.run([sys.executable, "-m", "transfer.detectron2.train_net", *argv, "MODEL.DEVICE", "cuda"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(_result_lines(done.stdout)) == 1 and (tmp_path / "model_final.pth").is_file()


def test_output_dir_of_an_earlier_run_is_refused_and_locked(ce_dirs, d2_voc, tmp_path, capsys):
    import json
    import os
    import socket

    from ce_pretrain.checkpoint import LOCK_NAME
    from transfer.detectron2.train_net import main

    devkit, root = d2_voc
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root)
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    assert main(argv) == 2
    assert "earlier run" in capsys.readouterr().err
    assert not (tmp_path / "encoder_detectron2").exists()  # refused before anything was written
    (tmp_path / "last_checkpoint").unlink()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert main(argv) == 2
    assert "another run" in capsys.readouterr().err
    # an OUTPUT_DIR override names the folder that is checked
    assert main([*argv, "OUTPUT_DIR", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "model_final.pth").exists()
    assert not (tmp_path / "other" / LOCK_NAME).exists()  # released when the run ends


def test_overwrite_deletes_the_earlier_checkpoints(ce_dirs, d2_voc, tmp_path, capsys):
    from transfer.detectron2.train_net import main

    devkit, root = d2_voc
    (tmp_path / "model_0000099.pth").write_bytes(b"an earlier, longer run")
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    (tmp_path / "notes.txt").write_text("the user's own file")
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root)
    assert main(["--overwrite", *argv]) == 0
    assert not (tmp_path / "model_0000099.pth").exists() and (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert (tmp_path / "notes.txt").exists()
    assert main(["--eval-only", "--overwrite", *argv]) == 2


def test_max_time_saves_a_checkpoint_that_resume_continues(ce_dirs, d2_voc, tmp_path, capsys):
    from transfer.detectron2.train_net import main

    devkit, root = d2_voc
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root, iters=3)
    assert main(["--max-time", "0.001", *argv]) == 0  # the budget was asked for: status 0
    captured = capsys.readouterr()
    assert "stopped by --max-time after iteration 1/3" in captured.err and "--resume" in captured.err
    assert _result_lines(captured.out) == []  # no evaluation of a run that did not finish
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000000.pth"
    assert torch.load(tmp_path / "model_0000000.pth", weights_only=True)["iteration"] == 0
    assert main(["--resume", *argv]) == 0
    captured = capsys.readouterr()
    assert "Starting training from iteration 1" in captured.out + captured.err
    assert len(_result_lines(captured.out)) == 1 and (tmp_path / "model_final.pth").is_file()


def test_sigterm_mid_run_saves_and_exits_143(ce_dirs, d2_voc, tmp_path, capsys, monkeypatch):
    """A real SIGTERM to this process after the second iteration, through the handler train_net installs."""
    import os
    import signal

    from transfer.detectron2.train_net import StopHook, main

    after_step = StopHook.after_step

    def signalled(self):
        if self.trainer.iter == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        after_step(self)

    monkeypatch.setattr(StopHook, "after_step", signalled)
    devkit, root = d2_voc
    argv = _argv("fast_rcnn_alexnet_voc07.yaml", ce_dirs / "alexnet", devkit, tmp_path, root, iters=10)
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after iteration 2/10" in err and "--resume" in err
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run


def test_checkpoints_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (builds from source: docs/transfer.md)")
    from transfer.detectron2.train_net import AtomicCheckpointer

    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=True)["iteration"] == 1

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpointer.save("model_0000002", iteration=2)
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"  # resume still finds a whole file
    assert checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file().endswith("model_0000001.pth")
