"""transfer.classification: fine-tuning, 10-crop testing, per-class AP, linear probe, on a synthetic VOC."""

import re

import pytest
import torch

from ce_pretrain import ContextEncoder
from transfer.classification.train import ClassificationConfig, LinearProbe, main, masked_bce, run
from transfer.common import VOC_CLASSES, load_encoder
from transfer.common.synthetic_voc import make_synthetic_voc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    ContextEncoder("resnet18", image_size=64).save_pretrained(root / "ce")
    return root / "ce", make_synthetic_voc(root / "data", num_images=8, size=64)


def test_masked_bce_ignores_difficult_labels():
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    full = masked_bce(logits, torch.tensor([[1, -1, 1]]))
    ignored = masked_bce(logits, torch.tensor([[1, -1, 0]]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(ignored, expected)
    assert full != ignored


@pytest.mark.parametrize("probe", [False, True])
def test_end_to_end(setup, tmp_path, probe):
    model_dir, data = setup
    result = run(ClassificationConfig(model=str(model_dir), data_root=str(data), max_steps=2, batch_size=4,
                                      test_crops=2, num_workers=0, linear_probe=probe, output_dir=str(tmp_path),
                                      save_model=not probe))
    assert result["steps"] == 2 and result["test_images"] == 4
    assert set(result["per_class_AP"]) == set(VOC_CLASSES)
    present = [a for a in result["per_class_AP"].values() if a is not None]
    assert present and all(0 <= a <= 100 for a in present) and 0 <= result["mAP"] <= 100
    assert (tmp_path / "results.json").is_file() and (tmp_path / "logs/classification/metrics.csv").is_file()
    assert not (tmp_path / "checkpoints").exists()  # a finished run keeps no resumable state
    if not probe:  # --save-model: the fine-tuned 20-way classifier as a timm folder, the VOC classes its labels
        import timm

        model = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
        assert model.pretrained_cfg["label_names"] == list(VOC_CLASSES) and model.num_classes == 20
        assert result["model_dir"] == str(tmp_path / "model")


def test_linear_probe_trains_only_the_linear_layer(setup):
    probe = LinearProbe(load_encoder(setup[0]), grid=2, num_classes=20)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert probe.fc.in_features == 512 * 4
    probe.train()
    assert not probe.features.training


PROG = "python -m transfer.classification.train"


def test_cli_errors_are_one_line_exit_2_before_any_work(setup, tmp_path, capsys):
    model, data = str(setup[0]), str(setup[1])
    (tmp_path / "file").write_text("")
    out = ["--output-dir", str(tmp_path / "out")]
    cases = [
        (["--model", model, "--data-root", str(tmp_path / "none"), *out], "--data-root .* does not exist"),
        (["--model", str(tmp_path / "none"), "--data-root", data, *out], "checkpoint"),
        (["--model", model, "--data-root", data, "--max-steps", "0", *out], "--max-steps must be at least 1, got 0"),
        (["--model", model, "--data-root", data, "--output-dir", str(tmp_path / "file" / "sub")], "not writable"),
        (["--model", model, "--data-root", data, "--linear-probe", "--save-model", *out], "--save-model keeps a"),
    ]
    for argv, pattern in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match(f"^{PROG}: error: .*{pattern}", err), err


def test_missing_annotation_reported_up_front(setup, tmp_path, capsys):
    data = make_synthetic_voc(tmp_path / "voc", num_images=4, size=32)
    ids = (data / "VOC2007/ImageSets/Main/trainval.txt").read_text().split()
    (data / "VOC2007/Annotations" / f"{ids[1]}.xml").unlink()
    argv = ["--model", str(setup[0]), "--data-root", str(data), "--output-dir", str(tmp_path / "out"),
            "--num-workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Annotations/{ids[1]}.xml" in err and "1 of 4 ids lack a file" in err
    assert not (tmp_path / "out" / "logs").exists()  # refused before training started
