"""transfer.imagefolder: folders and splits, the kNN and linear probes, fine-tuning and the entry point, on CPU."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.common.cli import RunInterrupted, UsageError
from transfer.imagefolder.data import ImageFolderError, per_class_subset, scan, stratified_split
from transfer.imagefolder.probes import (
    channel_health,
    classification_metrics,
    fit_linear,
    knn_scores,
    pool_grid,
    select_weight_decay,
)
from transfer.imagefolder.train import ImageFolderConfig, main, run


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: on a shared 2-core machine a second thread costs more in waiting than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def _folder(root, per_class=6, seed=0, classes=COLOURS):
    """One sub-folder per class; each class a colour with noise and a random bright square: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.normal(0, 40, (72, 80, 3)), 0, 255)
            x, y = rng.integers(0, 50, 2)
            img[y:y + 20, x:x + 20] = rng.integers(150, 255, 3)
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagefolder")
    swapped = {"red": COLOURS["blue"], "green": COLOURS["green"], "blue": COLOURS["red"]}  # mislabelled on purpose
    return _folder(base / "train", 8, 0), _folder(base / "val", 3, 1), _folder(base / "val2", 3, 2, swapped)


def _cfg(train, val, mode, **kw):
    kw = {"model": "random:alexnet", **kw}
    return ImageFolderConfig(train=str(train), val=str(val), mode=mode, image_size=67, batch_size=8, num_workers=0,
                             weight_decays=[1e-3, 1.0], **kw)


def test_scan_and_stratified_split(folders):
    samples, classes = scan(folders[0])
    assert classes == ["blue", "green", "red"] and len(samples) == 24
    rest, held = stratified_split(samples, 0.25, seed=3)
    assert sorted(rest + held) == sorted(samples) and not set(rest) & set(held)
    assert [sum(1 for _, y in held if y == c) for c in range(3)] == [2, 2, 2]
    assert stratified_split(samples, 0.25, seed=3) == (rest, held)
    assert stratified_split(samples, 0.25, seed=4)[1] != held


def test_val_with_an_unknown_class_is_refused(tmp_path, folders):
    _folder(tmp_path / "v", 1, classes={"purple": (120, 0, 120)})
    with pytest.raises(ImageFolderError, match="purple"):
        scan(tmp_path / "v", ["blue", "green", "red"])


def test_knn_is_a_temperature_weighted_cosine_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    scores = knn_scores(train, labels, query, num_classes=3, k=2, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    sims = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(query[1], dim=0)
    top = sims.topk(2)
    expected = torch.zeros(3).index_add_(0, labels[top.indices], (top.values / 0.07).exp())
    torch.testing.assert_close(scores[1], expected)
    assert (scores[0, 2] == 0) and (scores[0] > 0).sum() == 1  # only the k nearest vote


def test_linear_probe_weight_decay_shrinks_and_is_chosen_on_held_out_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    weak, strong = fit_linear(x, y, 2, 1e-4), fit_linear(x, y, 2, 10.0)
    assert strong.weight.norm() < weak.weight.norm() / 5
    assert (weak(x).argmax(1) == y).float().mean() == 1
    held = torch.randn(30, 5, generator=gen)
    best, acc = select_weight_decay(x, y, held, (held[:, 0] > 0).long(), 2, grid=[1e-4, 1e3])
    assert best == 1e-4 and acc[1e-4] > acc[1e3]


def test_metrics_top5_and_per_class():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    m = classification_metrics(scores, torch.tensor([0, 2, 1]), ["a", "b", "c"])
    assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == 100  # top-5 of 3 classes: all
    assert m["per_class"] == {"a": 100.0, "b": 0.0, "c": 0.0}


def test_pool_grid_targets_about_9k_values():
    assert [c * pool_grid(c, 27) ** 2 for c in (96, 256, 384)] == [9600, 9216, 9600]
    assert pool_grid(256, 3) == 3  # never more cells than the map has


def test_knn_mode_end_to_end_writes_results(folders, tmp_path):
    out = tmp_path / "knn"
    result = run(_cfg(folders[0], folders[1], "knn", output_dir=str(out)))
    saved = json.loads((out / "results.json").read_text())
    assert saved["top1"] == result["top1"] and set(saved["per_class"]) == {"blue", "green", "red"}
    assert list(saved["stages"]) == ["features.1", "features.5", "features.9", "features.11", "features.13",
                                     "features.14"]
    assert saved["stage"] in saved["stages"] and saved["val_images"] == 9
    assert saved["top1"] > 60  # colours separate even with random features; chance is 33 %


@pytest.mark.parametrize("features", ["standardised", "raw"])
def test_knn_features_are_standardised_or_raw_as_asked(folders, tmp_path, monkeypatch, features):
    import transfer.imagefolder.train as train_mod

    seen = []
    real = train_mod.knn_scores
    monkeypatch.setattr(train_mod, "knn_scores", lambda train, *a, **kw: seen.append(train) or real(train, *a, **kw))
    result = run(_cfg(folders[0], folders[1], "knn", output_dir=str(tmp_path), knn_features=features))
    assert len(seen) == 2 * len(result["stages"])  # the held-out split, then the test images, per stage
    standardised = [bool(x.mean(0).abs().max() < 1e-4) for x in seen]
    assert all(standardised) if features == "standardised" else not any(standardised)  # ReLU maps: mean > 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["knn_features"] == features


def test_channel_health_counts_channels_no_probe_can_use():
    feats = torch.rand(10, 4, 2, 2)  # [N, C, g, g]: channel 1 dead, channel 2 the same everywhere
    feats[:, 1] = 0
    feats[:, 2] = 3.0
    health = channel_health(feats.flatten(1), channels=4)
    assert health["inactive_channels"] == 0.5
    assert health["rms"] == pytest.approx(float(feats.pow(2).mean().sqrt()))
    assert channel_health(torch.rand(10, 16), channels=4)["inactive_channels"] == 0


def test_probes_report_each_stages_dead_units(folders, tmp_path):
    """A stage whose units never fire is visible in results.json, and the stages above it still count as alive."""
    from ce_pretrain import ContextEncoder

    model = ContextEncoder("alexnet", image_size=67)
    conv3 = model.encoder.model.features[8]
    with torch.no_grad():
        conv3.bias[:96] = -1e4  # a quarter of conv3's 384 units: ReLU gives 0 on every input
    model.save_pretrained(tmp_path / "m")
    result = run(_cfg(folders[0], folders[1], "knn", model=str(tmp_path / "m"), output_dir=str(tmp_path / "o")))
    health = {stage: s["health"] for stage, s in result["stages"].items()}
    assert 0.25 <= health["features.9"]["inactive_channels"] < 0.3  # the killed units, and a few these images miss
    assert health["features.1"]["inactive_channels"] < 0.05
    assert all(h["rms"] > 0 for h in health.values())


def test_linear_mode_never_looks_at_the_validation_images(folders, tmp_path):
    """The weight decay and the reported stage come from the training folder: another val set changes neither."""
    a = run(_cfg(folders[0], folders[1], "linear", output_dir=str(tmp_path / "a")))
    b = run(_cfg(folders[0], folders[2], "linear", output_dir=str(tmp_path / "b")))
    for stage in a["stages"]:
        assert a["stages"][stage]["selection"] == b["stages"][stage]["selection"]
    assert a["stage"] == b["stage"]
    assert a["top1"] > 60 and b["top1"] < a["top1"]  # the val sets do differ, and val scores follow them


def test_holdout_of_one_folder_and_rescale(folders, tmp_path):
    result = run(ImageFolderConfig(model="random:alexnet", train=str(folders[0]), holdout=0.25, mode="knn",
                                   image_size=67, batch_size=8, num_workers=0, rescale=True, rescale_images=8,
                                   output_dir=str(tmp_path / "h")))
    assert result["train_images"] == 18 and result["val_images"] == 6
    assert result["rescale"]["layers"][0] == "features.0"


def test_per_class_subset_is_seeded_nested_and_per_class():
    samples = [(f"{c}/{i}.jpg", c) for c in range(3) for i in range(10 - 3 * c)]  # 10, 7 and 4 images
    two = per_class_subset(samples, 2, seed=5)
    assert [sum(1 for _, y in two if y == c) for c in range(3)] == [2, 2, 2]
    assert two == per_class_subset(list(reversed(samples)), 2, seed=5)  # the order of the scan does not matter
    assert set(two) <= set(per_class_subset(samples, 3, seed=5))  # more labels keep the fewer ones
    assert two != per_class_subset(samples, 2, seed=6)
    assert len(per_class_subset(samples, 6, seed=0)) == 6 + 6 + 4  # a class with fewer keeps them all
    # one class's draw does not depend on the others
    assert [s for s in two if s[1] == 0] == [s for s in per_class_subset(samples[:10], 2, seed=5)]
    with pytest.raises(ImageFolderError, match="at least 1"):
        per_class_subset(samples, 0)


def test_labels_per_class_uses_that_many_labels_and_keeps_the_validation_set(folders, tmp_path):
    result = run(_cfg(folders[0], folders[1], "knn", labels_per_class=3, output_dir=str(tmp_path / "few")))
    assert result["train_images"] == 9 and result["val_images"] == 9
    assert result["config"]["labels_per_class"] == 3
    held = run(ImageFolderConfig(model="random:alexnet", train=str(folders[0]), holdout=0.25, labels_per_class=2,
                                 mode="knn", image_size=67, batch_size=8, num_workers=0,
                                 output_dir=str(tmp_path / "held")))
    assert held["train_images"] == 6 and held["val_images"] == 6  # the hold-out is carved out first


@pytest.mark.slow
def test_finetune_mode_trains_reports_and_keeps_a_model_timm_loads(folders, tmp_path):
    import timm

    from transfer.imagefolder.data import LabelledImages, eval_transform

    out = tmp_path / "ft"
    result = run(_cfg(folders[0], folders[1], "finetune", output_dir=str(out), max_steps=4, lr=1e-3,
                      save_model=True))
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 4 and saved["mode"] == "finetune"
    assert 0 <= saved["top1"] <= 100 and set(saved["per_class"]) == {"blue", "green", "red"}
    assert np.isfinite(result["final_loss"])
    # --save-model: the fine-tuned classifier as a timm folder, scoring the test images as results.json says
    assert saved["model_dir"] == str(out / "model") and not list(out.glob(".tmp-*"))
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert cfg["label_names"] == saved["classes"] and cfg["input_size"] == [3, 67, 67]
    val = LabelledImages(scan(folders[1], saved["classes"])[0], eval_transform(67, cfg["mean"], cfg["std"]))
    with torch.no_grad():
        logits = model(torch.stack([val[i][0] for i in range(len(val))]))
    top1 = (logits.argmax(1) == val.labels).float().mean().item() * 100
    assert top1 == pytest.approx(saved["top1"], abs=1e-4)
    assert not torch.equal(logits, torch.zeros_like(logits))
    # the same folder without --save-model, afresh: the earlier model goes with the earlier results
    run(_cfg(folders[0], folders[1], "finetune", output_dir=str(out), max_steps=1, overwrite=True))
    assert not (out / "model").exists() and "model_dir" not in json.loads((out / "results.json").read_text())


def test_a_saved_classifier_loads_in_timm_with_its_weights_classes_and_transform(tmp_path):
    import timm

    from transfer.common import load_encoder

    ckpt = load_encoder("random:resnet18", 64, seed=1)
    model = ckpt.create_model(num_classes=3)
    ckpt.save_classifier(model, tmp_path, ["cat", "dog", "fox"], 64)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = loaded.pretrained_cfg
    assert cfg["label_names"] == ["cat", "dog", "fox"] and cfg["input_size"] == [3, 64, 64]
    assert tuple(cfg["mean"]) == tuple(ckpt.mean) and cfg["crop_pct"] == 0.875


def test_bad_input_is_one_line_and_exit_2(tmp_path, folders, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    assert main(["--model", "random:alexnet", "--train", str(tmp_path / "none"), "--holdout", "0.2", *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["--model", "random:alexnet", "--train", str(folders[0]), "--holdout", "0.2", "--image-size",
                 "32", "--num-workers", "0", *out]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["--model", "random:alexnet", "--train", str(folders[0]), "--holdout", "0.2", "--labels-per-class",
                 "0", "--num-workers", "0", *out]) == 2
    assert "--labels-per-class must be at least 1" in capsys.readouterr().err


def test_more_bad_input_is_one_line_and_exit_2(tmp_path, folders, capsys):
    common = ["--model", "random:alexnet", "--num-workers", "0", "--output-dir", str(tmp_path / "out")]
    assert main([*common, "--train", str(folders[0]), "--holdout", "0"]) == 2  # was a TypeError from pathlib
    assert "hold-out fraction must be in (0, 1)" in capsys.readouterr().err
    assert main([*common, "--train", str(folders[0]), "--holdout", "0.2", "--mode", "linear", "--save-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mode linear trains none" in err
    assert main([*common, "--train", str(folders[0]), "--holdout", "0.2", "--mode", "linear", "--knn-features",
                 "raw"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--knn-features is the kNN's; --mode linear does not use it" in err
    with pytest.raises(SystemExit) as stop:  # argparse's own errors exit from the parser
        main([*common, "--train", str(folders[0]), "--val", str(folders[1]), "--holdout", "0.2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with argument" in err  # not argparse's whole usage
    # a tracker typo is refused in every mode, also knn, which logs nothing (it used to be ignored there)
    with pytest.raises(SystemExit) as stop:
        main([*common, "--train", str(folders[0]), "--holdout", "0.2", "--mode", "knn", "--log-with", "tensorbord"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'tensorbord' is not a tracker: csv, " in err
    empty = tmp_path / "empty-class"
    _folder(empty, 2, classes={"red": COLOURS["red"], "blue": COLOURS["blue"]})
    (empty / "green").mkdir()
    assert main([*common, "--train", str(empty), "--val", str(folders[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'green' holds no readable images" in err
    # a model that takes one size only (a ViT) at another: one line, not an AssertionError from timm
    assert main([*common, "--train", str(folders[0]), "--holdout", "0.2", "--model", "random:vit_tiny_patch16_224",
                 "--image-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes 224×224 images only" in err


def test_a_bad_model_fails_before_the_data_is_read_or_the_output_folder_made(tmp_path, folders, capsys):
    train = tmp_path / "train"
    _folder(train, 2)
    (train / "red" / "empty.jpg").write_bytes(b"")  # would be reported as skipped if the data were read first
    half = tmp_path / "half"  # a model folder whose weights never arrived
    half.mkdir()
    (half / "config.json").write_text('{"backbone": "alexnet"}')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"backbone": "alex')
    cases = {"random:notanet": "notanet", str(tmp_path / "absent"): "is not a directory",
             str(half): "has no model.safetensors", str(broken): "is not valid JSON"}
    for model, words in cases.items():
        out = tmp_path / "out"
        assert main(["--model", model, "--train", str(train), "--val", str(folders[1]), "--num-workers", "0",
                     "--mode", "knn", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "skipped" not in err, (model, err)
        assert not out.exists()


def test_unreadable_images_are_skipped_and_listed(tmp_path, folders, capsys):
    train = tmp_path / "train"
    _folder(train, 4)
    (train / "red" / "empty.jpg").write_bytes(b"")
    (train / "blue" / "page.jpg").write_text("<html>not an image</html>")
    out = tmp_path / "knn"
    assert main(["--model", "random:alexnet", "--train", str(train), "--val", str(folders[1]), "--image-size", "67",
                 "--num-workers", "0", "--batch-size", "8", "--output-dir", str(out)]) == 0
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())
    assert saved["train_images"] == 12 and len(saved["skipped_files"]) == 2
    assert {Path(line.split(":")[0]).name for line in saved["skipped_files"]} == {"empty.jpg", "page.jpg"}


def test_an_image_failing_in_a_loader_worker_is_reported_in_one_line(tmp_path, capsys):
    """An image that opens but does not decode fails inside a DataLoader worker, which re-raises it with the
    worker's traceback in the message; the error line is the original one."""
    from torch._utils import ExceptionWrapper

    from ce_pretrain.data import ImageReadError, load_rgb
    from transfer.common.cli import run_main
    from transfer.imagefolder.train import build_parser

    broken = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(broken)
    broken.write_bytes(broken.read_bytes()[:200])  # a JPEG header without its image data

    def run_(_args):
        try:
            load_rgb(broken)
        except ImageReadError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    argv = ["--model", "random:alexnet", "--train", str(tmp_path), "--holdout", "0.2"]
    assert run_main(build_parser(), run_, argv, errors=(ImageReadError,)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m transfer.imagefolder: error: cannot read image")
    assert "cut.jpg" in err


def _stop_during_stage(monkeypatch, call: int):
    """SIGTERM to this process at the ``call``-th kNN scoring (two per stage: the held-out split, then val)."""
    import os
    import signal

    import transfer.imagefolder.train as train_mod

    calls = []
    real = train_mod.knn_scores

    def scoring(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)  # the probe's StopRequest only flags it
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "knn_scores", scoring)
    return calls


def test_a_probe_stopped_by_sigterm_resumes_with_only_the_missing_stages(folders, tmp_path, monkeypatch, capsys):
    whole = run(_cfg(folders[0], folders[1], "knn", output_dir=str(tmp_path / "whole")))
    out = tmp_path / "cut"
    argv = ["--model", "random:alexnet", "--train", str(folders[0]), "--val", str(folders[1]), "--mode", "knn",
            "--image-size", "67", "--batch-size", "8", "--num-workers", "0", "--output-dir", str(out)]
    _stop_during_stage(monkeypatch, call=3)  # during the second stage: it finishes, then the probe stops
    assert main(argv) == 143
    assert "after 2/6 stages" in capsys.readouterr().err and not (out / "results.json").exists()
    saved = json.loads((out / "probe-stages.json").read_text())
    assert list(saved["stages"]) == ["features.1", "features.5"]
    assert main(argv) == 2  # an earlier run is there: neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    del saved["settings"]["knn_features"]  # a file written before the flag existed resumes as before
    (out / "probe-stages.json").write_text(json.dumps(saved))
    calls = _stop_during_stage(monkeypatch, call=10**6)
    assert main(argv + ["--resume"]) == 0
    assert len(calls) == 2 * 4  # only the four missing stages were scored
    result = json.loads((out / "results.json").read_text())
    assert list(result["stages"]) == list(whole["stages"])
    for stage, scores in whole["stages"].items():
        assert result["stages"][stage]["top1"] == scores["top1"]
        assert result["stages"][stage]["selection"] == scores["selection"]
    assert (result["top1"], result["stage"], result["complete"]) == (whole["top1"], whole["stage"], True)


def test_a_probe_resumed_with_other_settings_is_refused(folders, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _stop_during_stage(monkeypatch, call=1)
    with pytest.raises(RunInterrupted):
        run(_cfg(folders[0], folders[1], "knn", output_dir=str(out)))
    with pytest.raises(UsageError, match=r"other settings \(k\)"):
        run(_cfg(folders[0], folders[1], "knn", output_dir=str(out), resume="latest", k=5))
    # --overwrite starts afresh: the old stages are gone, every stage is scored again
    calls = _stop_during_stage(monkeypatch, call=10**6)
    result = run(_cfg(folders[0], folders[1], "knn", output_dir=str(out), overwrite=True, k=5))
    assert len(calls) == 12 and result["complete"] and result["config"]["k"] == 5


def test_a_probe_out_of_time_writes_an_incomplete_result_and_resumes(folders, tmp_path):
    out = tmp_path / "t"
    spent = run(_cfg(folders[0], folders[1], "linear", output_dir=str(out), max_time=1e-6))
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is False and saved["top1"] is None and spent["stages"] == {}
    done = run(_cfg(folders[0], folders[1], "linear", output_dir=str(out), resume="latest"))
    assert done["complete"] is True and len(done["stages"]) == 6 and done["top1"] > 60
