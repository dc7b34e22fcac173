"""transfer.mmseg: the converter everywhere; the real mmsegmentation (with compiled mmcv) where importable."""

import shutil

import numpy as np
import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.common import load_encoder
from transfer.common.features import TimmFeatures
from transfer.common.synthetic_voc import make_synthetic_voc
from transfer.common.voc import VOCLayoutError
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


def test_summary_shows_numpy_metrics():
    from transfer.mmseg.train import format_metrics

    # IoUMetric returns numpy floats, which `isinstance(v, float)` used to drop from the summary
    metrics = {"aAcc": np.float32(90.1), "mIoU": np.float32(61.2), "mAcc": np.float64(70.0), "IoU": "per class"}
    assert format_metrics(metrics) == "aAcc 90.10 mIoU 61.20 mAcc 70.00"


def test_train_without_mmseg_or_its_ops_is_one_line_exit_2(capsys):
    import importlib.util

    try:
        import mmcv.ops  # noqa: F401
        import mmseg  # noqa: F401

        pytest.skip("mmseg and mmcv's ops are installed: the command runs")
    except ImportError:
        pass
    from transfer.mmseg.train import main

    assert importlib.util.find_spec("transfer.mmseg.train") is not None
    assert main(["--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m transfer.mmseg.train: error: ") and err.count("\n") == 1


@pytest.fixture(scope="module")
def mm_config_voc(tmp_path_factory):
    """For the config side, which needs mmseg's registry and mmengine but not mmcv's compiled ops."""
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    return make_synthetic_voc(tmp_path_factory.mktemp("mmcfg"), num_images=8, size=64, year=2012)


def test_mmseg_config_without_val_holdout_and_cfg_options(mm_config_voc, ce_dir, tmp_path):
    from transfer.mmseg.train import build_config, parse_args

    root = tmp_path / "data"
    shutil.copytree(mm_config_voc, root)
    cfg = build_config(parse_args(_argv(ce_dir, root, tmp_path / "a")))
    # the test split is VOC's val split: no validation loop evaluates it a second time
    assert cfg.val_dataloader is None and cfg.val_cfg is None and cfg.val_evaluator is None
    assert cfg.test_dataloader.dataset.ann_file == "ImageSets/Segmentation/val.txt"
    (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(VOCLayoutError, match="val.txt.*--holdout"):
        build_config(parse_args(_argv(ce_dir, root, tmp_path / "b")))
    # --cfg-options are applied before the splits are checked
    cfg = build_config(parse_args([*_argv(ce_dir, root, tmp_path / "c"),
                                   "test_dataloader.dataset.ann_file=ImageSets/Segmentation/trainval.txt"]))
    assert cfg.test_dataloader.dataset.ann_file.endswith("trainval.txt")
    cfg = build_config(parse_args(_argv(ce_dir, root, tmp_path / "d", "--holdout", "0.5")))
    splits = tmp_path / "d" / "splits"
    held, fit = (splits / "holdout.txt").read_text().split(), (splits / "0_train_fit.txt").read_text().split()
    assert len(held) == 2 and sorted(held + fit) == sorted((root / "VOC2012/ImageSets/Segmentation/train.txt")
                                                           .read_text().split())
    assert not set(held) & set((splits / "1_aug_fit.txt").read_text().split())
    test = cfg.test_dataloader.dataset
    assert test.ann_file == str(splits / "holdout.txt") and test.data_prefix["seg_map_path"] == "SegmentationClass"


@pytest.fixture(scope="module")
def mm_voc(tmp_path_factory):
    pytest.importorskip("mmseg", reason="mmsegmentation is not installed")
    try:
        import mmcv.ops  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        pytest.skip("mmseg needs mmcv with compiled ops (mmcv-lite lacks the ops mmseg imports)")
    return make_synthetic_voc(tmp_path_factory.mktemp("mmvoc"), num_images=8, size=64, year=2012)


def _argv(ce_dir, devkit, out, *extra):
    return ["--model", str(ce_dir), "--data-root", str(devkit), "--output-dir", str(out), "--crop-size", "131",
            "--max-iters", "1", "--num-workers", "0", *extra, "--cfg-options", "train_dataloader.batch_size=2"]


def test_mmseg_segmentor_gets_every_tensor(mm_voc, ce_dir, tmp_path):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from transfer.mmseg.train import build_config, parse_args

    register_all_modules()
    cfg = build_config(parse_args(_argv(ce_dir, mm_voc, tmp_path)))
    segmentor = MODELS.build(cfg.model)
    segmentor.init_weights()
    ckpt = load_encoder(ce_dir)
    carried = {k[len(BACKBONE_PREFIX):]: v for k, v in segmentor.state_dict().items() if k.startswith(BACKBONE_PREFIX)}
    assert carried and all(torch.equal(v, ckpt.state_dict[k]) for k, v in carried.items())
    weights = torch.load(cfg.model.backbone.checkpoint, weights_only=True)["state_dict"]
    missing, unexpected = segmentor.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
    assert segmentor.data_preprocessor.mean.flatten().tolist() == pytest.approx([m * 255 for m in ckpt.mean])


def _count_metric_runs(monkeypatch) -> list:
    """Spy on mmseg's IoUMetric: the real ``compute_metrics`` runs; each evaluation is recorded."""
    from mmseg.evaluation import IoUMetric

    calls, compute = [], IoUMetric.compute_metrics

    def counted(self, results):
        calls.append(len(results))
        return compute(self, results)

    monkeypatch.setattr(IoUMetric, "compute_metrics", counted)
    return calls


def test_mmseg_train_evaluates_once_and_prints_miou(mm_voc, ce_dir, tmp_path, monkeypatch, capsys):
    from transfer.mmseg.train import main

    calls = _count_metric_runs(monkeypatch)
    assert main(_argv(ce_dir, mm_voc, tmp_path)) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert calls == [4]  # the 4 val images, once
    assert summary.startswith("aAcc ") and 0 <= float(summary.split("mIoU ")[1].split()[0]) <= 100


def test_mmseg_holdout_trains_and_tests_once(mm_voc, ce_dir, tmp_path, monkeypatch, capsys):
    from transfer.mmseg.train import main

    root = tmp_path / "data"
    shutil.copytree(mm_voc, root)
    (root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    calls = _count_metric_runs(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a relative --output-dir, as the docs' command has: its split files are found
    assert main(_argv(ce_dir, root, "out", "--holdout", "0.5")) == 0
    assert calls == [2]  # the 2 held-out images, once
    assert (tmp_path / "out" / "splits" / "holdout.txt").is_file()
    assert "mIoU" in capsys.readouterr().out.strip().splitlines()[-1]


def test_mmseg_output_dir_of_an_earlier_run_is_refused(mm_voc, ce_dir, tmp_path, capsys):
    from transfer.mmseg.train import main

    (tmp_path / "iter_5.pth").write_bytes(b"an earlier run")
    assert main(_argv(ce_dir, mm_voc, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "earlier run" in err and "--overwrite" in err
    assert not (tmp_path / "encoder_mmseg.pth").exists()  # refused before anything was written
    assert main(_argv(ce_dir, mm_voc, tmp_path, "--overwrite")) == 0
    assert not (tmp_path / "iter_5.pth").exists() and (tmp_path / "iter_1.pth").is_file()


def test_mmseg_max_time_saves_a_checkpoint_that_resume_continues(mm_voc, ce_dir, tmp_path, monkeypatch, capsys):
    from transfer.mmseg.train import main

    argv = [*_argv(ce_dir, mm_voc, tmp_path)]
    argv[argv.index("--max-iters") + 1] = "3"
    calls = _count_metric_runs(monkeypatch)
    assert main([*argv, "--max-time", "0.001"]) == 0  # the budget was asked for: status 0
    captured = capsys.readouterr()
    assert "stopped by --max-time after iteration 1/3" in captured.err and "--resume" in captured.err
    assert calls == [] and not [ln for ln in captured.out.splitlines() if ln.startswith("aAcc ")]  # not tested
    assert (tmp_path / "last_checkpoint").read_text().strip() == str(tmp_path / "iter_1.pth")
    # mmengine's checkpoint (optimiser, schedulers, log history) reads back under weights_only=True
    assert main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed epoch: 0, iter: 1" in captured.out + captured.err
    assert calls == [4] and "mIoU" in captured.out.strip().splitlines()[-1]


def test_mmseg_sigterm_mid_run_saves_and_exits_143(mm_voc, ce_dir, tmp_path, monkeypatch, capsys):
    """A real SIGTERM to this process during the second iteration, through the handler the run installs."""
    import os
    import signal

    from transfer.mmseg import train

    real = train.stop_hook

    def signalling(stop):
        hook = real(stop)
        after = hook.after_train_iter

        def after_train_iter(runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            after(runner, batch_idx, data_batch=data_batch, outputs=outputs)

        hook.after_train_iter = after_train_iter
        return hook

    monkeypatch.setattr(train, "stop_hook", signalling)
    argv = [*_argv(ce_dir, mm_voc, tmp_path)]
    argv[argv.index("--max-iters") + 1] = "10"
    assert train.main(argv) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after iteration 2/10" in err
    assert (tmp_path / "last_checkpoint").read_text().strip() == str(tmp_path / "iter_2.pth")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_reads_mmengine_history_but_refuses_any_other_getattr(tmp_path):
    pytest.importorskip("mmengine", reason="mmengine is not installed")
    from mmengine.logging import HistoryBuffer

    from transfer.mmseg.train import _safe_checkpoint_types

    history = HistoryBuffer()
    history.update(2.0)
    torch.save({"log": history, "array": np.arange(3.0), "scalar": np.float32(1.5)}, tmp_path / "ok.pth")

    class Crafted:
        def __reduce__(self):
            return getattr, (HistoryBuffer, "__init__")  # a first step towards a function's globals

    torch.save({"x": Crafted()}, tmp_path / "crafted.pth")
    with torch.serialization.safe_globals(_safe_checkpoint_types()):
        loaded = torch.load(tmp_path / "ok.pth", weights_only=True)
        with pytest.raises(Exception, match="refusing getattr"):
            torch.load(tmp_path / "crafted.pth", weights_only=True)
    assert loaded["log"].mean() == 2.0 and loaded["array"].tolist() == [0, 1, 2] and loaded["scalar"] == 1.5
    with pytest.raises(Exception, match="HistoryBuffer"):  # and without the allowlist, nothing of it loads
        torch.load(tmp_path / "ok.pth", weights_only=True)
