"""benchmarks/table2.py, the feature study: data split, rows, the tables and figure, and resume of finished cells."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import write_images

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table2.py"


@pytest.fixture(scope="module")
def table2():
    spec = importlib.util.spec_from_file_location("table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["table2"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("table2", None)


@pytest.fixture
def classes(tmp_path):
    for i, name in enumerate(["cat", "dog", "owl"]):
        write_images(tmp_path / "src" / name, n=7, size=(72, 80), seed=i)
    return tmp_path / "src"


def test_data_split_is_fixed_stratified_and_disjoint(table2, classes, tmp_path):
    budget = table2.BUDGETS["smoke"]
    manifest = table2.prepare_data(classes, tmp_path / "d", budget)
    train = sorted(p.name for p in (tmp_path / "d" / "train").rglob("*.*"))
    val = {(p.parent.name, p.name) for p in (tmp_path / "d" / "val").rglob("*.*")}
    assert manifest["val_images"] == 3 * budget.val_per_class == len(val)
    assert manifest["train_images"] == 3 * min(budget.train_per_class, 7 - budget.val_per_class) == len(train)
    assert not val & {(p.parent.name, p.name) for p in (tmp_path / "d" / "train").rglob("*.*")}
    again = table2.prepare_data(classes, tmp_path / "d2", budget)
    assert again == manifest and {(p.parent.name, p.name) for p in (tmp_path / "d2" / "val").rglob("*.*")} == val


def test_rows_overrides_and_added_rows(table2):
    args = table2.parse_args(["--add-row", 'ce-l1=--mask random-region --loss l1', "--pretrain-override",
                              "ce-center=--lr 1e-4", "--rows", "ce-center", "ce-l1", "random-timm"])
    rows = table2.build_rows(args)
    assert rows == {"ce-center": ["--mask", "center", "--lr", "1e-4"], "ce-l1": ["--mask", "random-region", "--loss",
                                                                                "l1"], "random-timm": None}
    budget = table2.BUDGETS["small"]
    assert table2.row_batch_size(rows["ce-l1"], budget) == budget.batch_size
    assert table2.row_batch_size(["--mask", "center", "--batch-size", "256"], budget) == 256  # images seen follow it
    with pytest.raises(table2.StudyError, match="not a pretrained row"):
        table2.build_rows(table2.parse_args(["--pretrain-override", "random-timm=--lr 1"]))


def test_table_reports_mean_and_std_over_seeds_and_the_figure_is_written(table2, tmp_path):
    cells = {}
    for seed, score in [(0, 50.0), (1, 54.0)]:
        for row, images in [("ce-region", 16), ("ce-region", 32), ("random-timm", 0)]:
            key = table2.cell_key(row, seed, images, "knn")
            cells[key] = {"row": row, "seed": seed, "images": images, "column": "knn",
                          "score": score + images / 8}
    table = table2.format_table(cells, ["ce-region", "random-timm"], ["knn"], "header")
    assert "| context encoder (random region) | 32 | 56.0 ± 2.8 |" in table  # 50+4, 54+4
    assert "| random init (timm) | 0 | 52.0 ± 2.8 |" in table
    assert "| context encoder (random region) | 16 | 54.0 ± 2.8 |" in table  # the by-images table
    table2.plot(cells, ["ce-region", "random-timm"], ["knn"], tmp_path / "t.png", "title")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_is_one_line_exit_2(table2, tmp_path, capsys):
    assert table2.main(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("table2.py: error: --data") and err.count("\n") == 1


def _study(table2, classes, out, *extra):
    return table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows",
                        "random-timm", "--columns", "knn", "--seeds", "0", "1", "--num-workers", "0", "--cpu",
                        "--cpu-threads", "1", *extra])


def test_a_finished_cell_is_never_recomputed(table2, classes, tmp_path):
    out = tmp_path / "study"
    assert _study(table2, classes, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"random-timm/seed0/images0/knn", "random-timm/seed1/images0/knn"}
    assert (out / "table2.md").is_file() and (out / "table2.png").is_file()
    # mark a finished cell, and drop the other as if the run had crashed before it
    results["cells"]["random-timm/seed0/images0/knn"]["score"] = -7.0
    lost = results["cells"].pop("random-timm/seed1/images0/knn")
    (out / "results.json").write_text(json.dumps(results))
    assert _study(table2, classes, out) == 0
    again = json.loads((out / "results.json").read_text())["cells"]
    assert again["random-timm/seed0/images0/knn"]["score"] == -7.0  # kept, not recomputed
    assert again["random-timm/seed1/images0/knn"]["score"] == pytest.approx(lost["score"])  # recomputed, same
    assert f"| random init (timm) | 0 | {(lost['score'] - 7.0) / 2:.1f} ± " in (out / "table2.md").read_text()


@pytest.mark.slow
def test_pretrained_row_resumes_its_pretraining_between_milestones(table2, classes, tmp_path):
    out = tmp_path / "study"
    assert table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows", "ce-region",
                        "--columns", "knn", "--milestones", "1", "2", "--num-workers", "0", "--cpu"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    batch = table2.BUDGETS["smoke"].batch_size
    assert set(cells) == {f"ce-region/seed0/images{batch}/knn", f"ce-region/seed0/images{2 * batch}/knn"}
    log = (out / "pretrain" / "ce-region" / "seed0" / "pretrain.log").read_text()
    assert "resumed from" in log and "at step 1" in log


@pytest.mark.slow
def test_voc_columns_run_through_the_entry_points(table2, classes, tmp_path):
    from transfer.common.synthetic_voc import make_synthetic_voc

    devkit = make_synthetic_voc(tmp_path / "voc", num_images=12, size=64, year=2012)
    out = tmp_path / "study"
    assert table2.main(["--budget", "smoke", "--data", str(classes), "--voc-root", str(devkit), "--output-dir",
                        str(out), "--rows", "random-timm", "--columns", "voc-cls", "voc-det", "voc-seg",
                        "--num-workers", "0", "--cpu", "--cpu-threads", "1"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(c["column"] for c in cells.values()) == ["voc-cls", "voc-det", "voc-seg"]
    assert all(0 <= c["score"] <= 100 and c["steps"] >= 1 for c in cells.values())
    assert "Paper, Table 2" in (out / "table2.md").read_text()
