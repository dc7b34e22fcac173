"""transfer.classification: fine-tuning, 10-crop testing, per-class AP, linear probe, on a synthetic VOC."""

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
                                      test_crops=2, workers=0, linear_probe=probe, output=str(tmp_path / "r.json")))
    assert result["steps"] == 2 and result["test_images"] == 4
    assert set(result["per_class_AP"]) == set(VOC_CLASSES)
    present = [a for a in result["per_class_AP"].values() if a is not None]
    assert present and all(0 <= a <= 100 for a in present) and 0 <= result["mAP"] <= 100
    assert (tmp_path / "r.json").is_file()


def test_linear_probe_trains_only_the_linear_layer(setup):
    probe = LinearProbe(load_encoder(setup[0]), grid=2, num_classes=20)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert probe.fc.in_features == 512 * 4
    probe.train()
    assert not probe.features.training


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    with pytest.raises(SystemExit, match="^error: --data-root .* does not exist$"):
        main(["--model", str(setup[0]), "--data-root", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="^error: checkpoint"):
        main(["--model", str(tmp_path / "none"), "--data-root", str(setup[1])])
