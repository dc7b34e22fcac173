"""benchmarks/table2.py: the table and its collection from parallel runs; the whole loop on a tiny VOC (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest

from transfer.common.synthetic_voc import make_synthetic_voc

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table2.py"


@pytest.fixture(scope="module")
def table2():
    spec = importlib.util.spec_from_file_location("table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_merges_runs_in_method_order(table2, tmp_path):
    args = {"backbone": "alexnet", "image_size": 131, "pretrain_steps": 5, "pretrain_batch_size": 4, "cls_steps": 1,
            "det_steps": 1, "seg_steps": 1}
    for method, value in [("random", 1.0), ("context-encoder", 3.0)]:
        (tmp_path / method).mkdir()
        row = {"classification": value, "detection": value, "segmentation": value}
        (tmp_path / method / "results.json").write_text(json.dumps({"args": args, "results": {method: row}}))
    table = table2.collect([str(tmp_path / "random"), str(tmp_path / "context-encoder")])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "pretraining" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["context-encoder", "random"]
    assert "| 3.0 | 3.0 | 3.0 | 56.5 / 44.5 / 29.7 |" in rows[0]


def test_missing_data_is_one_line(table2, tmp_path):
    with pytest.raises(SystemExit, match="^error: --data-root"):
        table2.main(["--data-root", str(tmp_path / "none"), "--pretrain-data", str(tmp_path)])


@pytest.mark.slow
def test_whole_loop_on_a_tiny_voc(table2, tmp_path):
    devkit = make_synthetic_voc(tmp_path / "voc", num_images=12, size=64, year=2012)
    images = devkit / "VOC2012" / "JPEGImages"
    table2.main(["--pretrain-data", str(images), "--data-root", str(devkit), "--seg-train-split", "train",
                 "--seg-test-split", "val", "--backbone", "resnet18", "--image-size", "64", "--pretrain-steps", "2",
                 "--pretrain-batch-size", "4", "--cls-steps", "1", "--det-steps", "1", "--det-size", "64",
                 "--seg-steps", "1", "--workers", "0", "--output-dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert set(results) == {"context-encoder", "autoencoder", "random"}
