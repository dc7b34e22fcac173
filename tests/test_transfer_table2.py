"""The feature study (``benchmarks/table2.py`` over ``transfer.study``): data split, rows, tables and figure, resume."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import write_images

from transfer.study.budgets import BUDGETS, StudyError, prepare_data, pretraining_folder, row_batch_size
from transfer.study.cells import cell_key
from transfer.study.report import format_table, mixed_environments, plot

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table2.py"


@pytest.fixture(scope="module")
def table2():
    spec = importlib.util.spec_from_file_location("table2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def classes(tmp_path):
    for i, name in enumerate(["cat", "dog", "owl"]):
        write_images(tmp_path / "src" / name, n=7, size=(72, 80), seed=i)
    return tmp_path / "src"


def test_data_split_is_fixed_stratified_and_disjoint(classes, tmp_path):
    budget = BUDGETS["smoke"]
    manifest = prepare_data(classes, tmp_path / "d", budget)
    train = sorted(p.name for p in (tmp_path / "d" / "train").rglob("*.*"))
    val = {(p.parent.name, p.name) for p in (tmp_path / "d" / "val").rglob("*.*")}
    assert manifest["val_images"] == 3 * budget.val_per_class == len(val)
    assert manifest["train_images"] == 3 * min(budget.train_per_class, 7 - budget.val_per_class) == len(train)
    assert not val & {(p.parent.name, p.name) for p in (tmp_path / "d" / "train").rglob("*.*")}
    again = prepare_data(classes, tmp_path / "d2", budget)
    assert again == manifest and {(p.parent.name, p.name) for p in (tmp_path / "d2" / "val").rglob("*.*")} == val


def test_a_split_shipped_as_files_keeps_its_split(classes, tmp_path):
    """The data folder of one study, copied with its images (as `tar -ch` ships it), is the same split in another;
    a study cannot take its own split as --data (preparing it would delete it)."""
    import shutil

    budget = BUDGETS["smoke"]
    manifest = prepare_data(classes, tmp_path / "d", budget)
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "d", shipped)  # follows the links: real files, as after `tar -chf` and `tar -xf`
    again = prepare_data(shipped, tmp_path / "elsewhere" / "data", budget)

    def split(root):
        return {(p.parent.parent.name, p.parent.name, p.name) for p in root.rglob("*.*") if p.name != "manifest.json"}

    assert split(tmp_path / "elsewhere" / "data") == split(tmp_path / "d")
    assert {k: again[k] for k in ("train_images", "val_images", "classes")} == \
        {k: manifest[k] for k in ("train_images", "val_images", "classes")}
    with pytest.raises(StudyError, match="own split"):
        prepare_data(tmp_path / "d", tmp_path / "d", budget)
    assert split(tmp_path / "d")  # still there


def _files(root):
    return {(p.parent.name, p.name) for p in root.rglob("*.*")}


def test_unlabeled_images_join_pretraining_and_leave_the_labelled_split_as_it_was(tmp_path):
    """--unlabeled-per-class: pretraining reads the training images plus images of no split; the classifiers'
    training and test images are the same as without it, and no test image reaches pretraining."""
    import shutil

    for i, name in enumerate(["cat", "dog", "owl"]):
        write_images(tmp_path / "src" / name, n=12, size=(40, 48), seed=i)  # smoke: 3 test + 6 train, 3 left
    budget = BUDGETS["smoke"]
    plain = prepare_data(tmp_path / "src", tmp_path / "plain", budget)
    more = prepare_data(tmp_path / "src", tmp_path / "more", budget, unlabeled_per_class=2)
    assert "unlabeled_images" not in plain and more["unlabeled_images"] == 3 * 2
    for split in ("train", "val"):
        assert _files(tmp_path / "more" / split) == _files(tmp_path / "plain" / split)
    pre, train, val = (_files(tmp_path / "more" / s) for s in ("pretrain", "train", "val"))
    assert train < pre and not pre & val and len(pre) == len(train) + 6
    assert pretraining_folder(tmp_path / "plain") == tmp_path / "plain" / "train"
    assert pretraining_folder(tmp_path / "more") == tmp_path / "more" / "pretrain"
    every = prepare_data(tmp_path / "src", tmp_path / "every", budget, unlabeled_per_class=100)
    assert every["unlabeled_images"] == 3 * 3  # all that is left

    shipped = tmp_path / "shipped"  # a split shipped with its images keeps its pretraining images too
    shutil.copytree(tmp_path / "more", shipped)
    prepare_data(shipped, tmp_path / "again", budget, unlabeled_per_class=2)
    assert _files(tmp_path / "again" / "pretrain") == pre
    shutil.copytree(tmp_path / "plain", tmp_path / "shipped-plain")  # a split without any: one line, not 0 images
    with pytest.raises(StudyError, match="has no images beyond the 18 training and 9 test images"):
        prepare_data(tmp_path / "shipped-plain", tmp_path / "none", budget, unlabeled_per_class=100)


def test_cpu_budget_studies_the_small_budgets_images(tmp_path):
    """`--budget cpu` is the small budget's study at 99 px: the same training and test images, so its numbers are
    read against the GPU study's."""
    for i, name in enumerate(["cat", "dog"]):
        write_images(tmp_path / "src" / name, n=460, size=(40, 48), seed=i)  # more than the budgets take
    cpu, small = BUDGETS["cpu"], BUDGETS["small"]
    a = prepare_data(tmp_path / "src", tmp_path / "cpu", cpu)
    prepare_data(tmp_path / "src", tmp_path / "small", small)

    def split(root):
        return {(p.parent.parent.name, p.parent.name, p.name) for p in root.rglob("*.*") if p.name != "manifest.json"}

    assert a["train_images"] == 2 * 350 and a["val_images"] == 2 * 100
    assert split(tmp_path / "cpu") == split(tmp_path / "small")
    assert cpu.image_size == cpu.transfer_size == 99 and cpu.columns == ("finetune", "linear", "knn")
    assert cpu.milestones[-1] * cpu.batch_size == 128_000  # the CPU measurements' last milestone


def test_rows_overrides_and_added_rows(table2):
    args = table2.parse_args(["--add-row", 'ce-l1=--mask random-region --loss l1', "--pretrain-override",
                              "ce-center=--lr 1e-4", "--rows", "ce-center", "ce-l1", "random-timm"])
    rows = table2.build_rows(args)
    assert rows == {"ce-center": ["--mask", "center", "--lr", "1e-4"], "ce-l1": ["--mask", "random-region", "--loss",
                                                                                "l1"], "random-timm": None}
    budget = BUDGETS["small"]
    assert row_batch_size(rows["ce-l1"], budget) == budget.batch_size
    assert row_batch_size(["--mask", "center", "--batch-size", "256"], budget) == 256  # images seen follow it
    with pytest.raises(StudyError, match="not a pretrained row"):
        table2.build_rows(table2.parse_args(["--pretrain-override", "random-timm=--lr 1"]))


def test_table_reports_mean_and_std_over_seeds_and_the_figure_is_written(tmp_path):
    cells = {}
    for seed, score in [(0, 50.0), (1, 54.0)]:
        for row, images in [("ce-region", 16), ("ce-region", 32), ("random-timm", 0)]:
            key = cell_key(row, seed, images, "knn")
            cells[key] = {"row": row, "seed": seed, "images": images, "column": "knn",
                          "score": score + images / 8}
    table = format_table(cells, ["ce-region", "random-timm"], ["knn"], "header")
    assert "| context encoder (random region) | 32 | 56.0 ± 2.8 |" in table  # 50+4, 54+4
    assert "| random init (timm) | 0 | 52.0 ± 2.8 |" in table
    assert "| context encoder (random region) | 16 | 54.0 ± 2.8 |" in table  # the by-images table
    plot(cells, ["ce-region", "random-timm"], ["knn"], tmp_path / "t.png", "title")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_is_one_line_exit_2(table2, tmp_path, capsys):
    assert table2.main(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("table2.py: error: --data") and err.count("\n") == 1


def _study(table2, classes, out, *extra):
    return table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows",
                        "random-timm", "--columns", "knn", "--seeds", "0", "1", "--num-workers", "0", "--cpu",
                        "--cpu-threads", "1", *extra])


def test_one_study_at_a_time_per_folder(table2, classes, tmp_path, capsys):
    """A second study on a folder in use is refused in one line before it touches anything (two would rewrite each
    other's results.json and data split); the lock goes with the study, so the next one runs."""
    from ce_pretrain.checkpoint import LOCK_NAME, RunLock

    out = tmp_path / "study"
    out.mkdir()
    with RunLock(out):  # held by a live process (this one), as by a study still running
        assert _study(table2, classes, out, "--prepare-only") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "is writing to" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no split, no results
    assert _study(table2, classes, out, "--prepare-only") == 0
    assert (out / "data" / "manifest.json").is_file() and not (out / LOCK_NAME).exists()


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


def test_a_fine_tuning_cell_cut_short_resumes_from_its_checkpoint(table2, classes, tmp_path, monkeypatch, capsys):
    """A study killed during a fine-tuning cell resumes that cell from its last checkpoint, to the same score as an
    uninterrupted run (bit-identical on CPU without loader workers)."""
    import dataclasses

    import transfer.imagefolder.train as imagefolder

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _study(table2, classes, whole, "--columns", "finetune", "--seeds", "0") == 0
    real_run = imagefolder.run

    def killed_after_a_step(cfg):
        real_run(dataclasses.replace(cfg, max_time=1e-9))  # stops after its first step, with a checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefolder, "run", killed_after_a_step)
    assert _study(table2, classes, cut, "--columns", "finetune", "--seeds", "0") == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    monkeypatch.setattr(imagefolder, "run", real_run)
    assert _study(table2, classes, cut, "--columns", "finetune", "--seeds", "0") == 0
    assert "resumed from " in capsys.readouterr().out
    key = "random-timm/seed0/images0/finetune"
    cells = [json.loads((d / "results.json").read_text())["cells"][key] for d in (whole, cut)]
    assert cells[1]["score"] == cells[0]["score"] and cells[1]["steps"] == BUDGETS["smoke"].finetune_steps

    def forget_the_cell():  # as if the study died after the cell's run ended, before it saved the cell
        results = json.loads((cut / "results.json").read_text())
        del results["cells"][key]
        del results["rescale"]  # and as if it were older than any record of its transfer settings
        del results["transfer"]
        (cut / "results.json").write_text(json.dumps(results))

    forget_the_cell()
    capsys.readouterr()
    assert _study(table2, classes, cut, "--columns", "finetune", "--seeds", "0") == 0
    assert "holds the finished run; nothing to resume" in capsys.readouterr().err
    forget_the_cell()
    assert _study(table2, classes, cut, "--columns", "finetune", "--seeds", "0", "--rescale") == 0
    assert "is of another run: --rescale was False, now True" in capsys.readouterr().out  # so it starts over
    assert json.loads((cut / "results.json").read_text())["cells"][key]["steps"] == BUDGETS["smoke"].finetune_steps


def test_each_cell_records_where_it_was_measured_and_the_table_flags_a_mix(table2, classes, tmp_path):
    out = tmp_path / "study"
    assert _study(table2, classes, out) == 0
    results = json.loads((out / "results.json").read_text())
    envs = [c["environment"] for c in results["cells"].values()]
    assert envs[0] == envs[1] == results["environment"] and envs[0]["threads"] == 1  # --cpu-threads 1
    assert "1 CPU thread;" in (out / "table2.md").read_text() and "another environment" not in (
        out / "table2.md").read_text()
    # one cell as if measured on another machine: a rerun (nothing to recompute) says so in the header
    results["cells"]["random-timm/seed0/images0/knn"]["environment"] = dict(envs[0], threads=2)
    (out / "results.json").write_text(json.dumps(results))
    assert _study(table2, classes, out) == 0
    assert "Of its 2 cells, 1 in another environment" in (out / "table2.md").read_text()


def test_mixed_environments_counts_other_and_unrecorded_cells():
    here = {"device": "x86_64 CPU ×2", "threads": 1}
    cells = {"a": {"environment": here}, "b": {"environment": dict(here, threads=2)}, "c": {}}
    assert mixed_environments(cells, here) == (" Of its 3 cells, 1 in another environment and 1 in an unrecorded one "
                                               "(each cell's is in results.json).")
    assert mixed_environments({"a": {"environment": here}}, here) == ""


def test_a_study_scored_without_rescale_is_not_mixed_with_rescaled_cells(table2, classes, tmp_path, capsys):
    out = tmp_path / "study"
    assert _study(table2, classes, out, "--seeds", "0") == 0
    assert "rescaled" not in (out / "table2.md").read_text()
    capsys.readouterr()
    assert _study(table2, classes, out, "--seeds", "0", "--rescale") == 2
    err = capsys.readouterr().err
    assert "holds a study run without --rescale" in err and err.count("\n") == 1
    assert _study(table2, classes, tmp_path / "rescaled", "--seeds", "0", "--rescale") == 0
    assert json.loads((tmp_path / "rescaled" / "results.json").read_text())["rescale"] is True
    assert "every row rescaled (Krähenbühl) before transfer" in (tmp_path / "rescaled" / "table2.md").read_text()


def test_few_labels_and_fine_tuning_length_reach_every_cell_and_are_never_mixed(table2, classes, tmp_path, capsys):
    out = tmp_path / "few"
    assert _study(table2, classes, out, "--seeds", "0", "--columns", "knn", "finetune", "--labels-per-class", "2",
                  "--finetune-steps", "2", "--transfer-jobs", "2") == 0  # the cells run in processes of their own
    saved = json.loads((out / "results.json").read_text())
    assert saved["transfer"] == {"rescale": False, "labels_per_class": 2, "finetune_steps": 2}
    for column in ("knn", "finetune"):
        cell = json.loads((out / "cells" / f"random-timm_seed0_images0_{column}" / "results.json").read_text())
        assert cell["train_images"] == 3 * 2, column  # 3 classes
    assert saved["cells"]["random-timm/seed0/images0/finetune"]["steps"] == 2
    assert "2 labelled images per class; fine-tuned 2 steps" in (out / "table2.md").read_text()
    capsys.readouterr()
    for other in (["--labels-per-class", "3", "--finetune-steps", "2"], ["--finetune-steps", "2"],
                  ["--labels-per-class", "2"]):
        assert _study(table2, classes, out, "--seeds", "0", *other) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds a study run" in err, other
    assert _study(table2, classes, out, "--seeds", "0", "--labels-per-class", "0") == 2
    assert "--labels-per-class must be at least 1" in capsys.readouterr().err


def test_a_study_pretrains_on_unlabeled_images_and_is_never_mixed_with_one_that_did_not(table2, tmp_path, capsys):
    for i, name in enumerate(["cat", "dog", "owl"]):
        write_images(tmp_path / "src" / name, n=11, size=(40, 48), seed=i)  # smoke: 3 test + 6 train, 2 left
    out = tmp_path / "study"

    def study(*extra):
        return table2.main(["--budget", "smoke", "--data", str(tmp_path / "src"), "--output-dir", str(out),
                            "--rows", "ce-region", "--columns", "knn", "--milestones", "1", "--num-workers", "0",
                            "--cpu", "--cpu-threads", "1", "--data-cache", "on", *extra])

    assert study("--unlabeled-per-class", "5") == 0
    summary = json.loads((out / "pretrain" / "ce-region" / "seed0" / "train_summary.json").read_text())
    assert summary["config"]["data"] == str(out / "data" / "pretrain")
    cache = json.loads((out / "data" / f"cache-{BUDGETS['smoke'].image_size}px.npy.json").read_text())
    assert cache["images"] == 3 * (6 + 2)  # the decoded cache holds the pretraining images, not the labelled ones
    saved = json.loads((out / "results.json").read_text())
    assert saved["pretraining"] == {"unlabeled_per_class": 5} and saved["data"]["unlabeled_images"] == 6
    assert "on 24 (18 labelled + 6 unlabeled) images" in (out / "table2.md").read_text()
    knn = json.loads((out / "cells" / "ce-region_seed0_images8_knn" / "results.json").read_text())
    assert knn["train_images"] == 18  # the classifier still sees the labelled images only
    capsys.readouterr()
    assert study() == 2  # the pretraining would resume on other images, and its cells share keys
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a study run --unlabeled-per-class 5" in err
    assert study("--unlabeled-per-class", "0") == 2
    assert "--unlabeled-per-class must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["1", "2"])  # pretraining waited for by the main thread, or by a worker thread
def test_killing_the_study_makes_its_pretraining_process_checkpoint_and_stop(classes, tmp_path, jobs):
    """SIGTERM to the study reaches the train.py it started (a plain `kill` reaches only the study's own process):
    the run saves a checkpoint and stops before the study exits 143 with a line saying how to continue."""
    import signal
    import subprocess
    import sys
    import time

    from ce_pretrain.checkpoint import LOCK_NAME

    out = tmp_path / "study"
    study = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--budget", "smoke", "--data", str(classes), "--output-dir", str(out),
         "--rows", "ce-region", "--columns", "knn", "--milestones", "5000", "--num-workers", "0", "--cpu",
         "--cpu-threads", "1", "--pretrain-jobs", jobs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "pretrain" / "ce-region" / "seed0" / "pretrain.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "| 3/5000" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert study.poll() is None, study.communicate()
    study.send_signal(signal.SIGTERM)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 143, err
    assert "1 running process(es) told to save and stop" in err and "rerun the same command" in err
    assert not (log.parent / LOCK_NAME).exists()  # train.py had ended (and released its folder) before the study
    assert "SIGTERM: stopping after this step and saving a checkpoint" in log.read_text()
    assert list((out / "pretrain" / "ce-region" / "seed0" / "checkpoints").iterdir())


def test_every_milestone_asks_for_fine_tuning_at_each_snapshot_and_only_for_missing_cells(tmp_path):
    """Which cells a study still owes (the default suite's check of --every-milestone; the slow test below runs it)."""
    from transfer.study.cells import Study, _missing

    budget = BUDGETS["smoke"]  # milestones 2, 4
    study = Study(out=tmp_path, budget_name="smoke", budget=budget, rows={"ce-region": ["--mask", "random-region"]},
                  columns=("finetune", "knn"), seeds=[0])
    owed = {s: _missing(study, "ce-region", ["--mask", "random-region"], 0, s) for s in budget.milestones}
    assert owed == {2: ["knn"], 4: ["finetune", "knn"]}
    study.every_milestone = True
    study.cells[cell_key("ce-region", 0, 2 * budget.batch_size, "knn")] = {"score": 1.0}
    owed = {s: _missing(study, "ce-region", ["--mask", "random-region"], 0, s) for s in budget.milestones}
    assert owed == {2: ["finetune"], 4: ["finetune", "knn"]}


def test_pretraining_passes_and_keeps_every_milestone_up_to_the_last_one_needed(tmp_path):
    """A study that scores only the last milestone (fine-tuning) still keeps an encoder at each earlier one: a run
    cannot go back, so a later study with probes or --every-milestone would otherwise have none to score."""
    from transfer.study.cells import Study, _pretraining_plan

    budget = BUDGETS["smoke"]  # milestones 2, 4
    flags = ["--mask", "random-region"]
    study = Study(out=tmp_path, budget_name="smoke", budget=budget, rows={"ce-region": flags, "random-timm": None},
                  columns=("finetune",), seeds=[0])
    assert _pretraining_plan(study) == [("ce-region", flags, 0, [2, 4])]
    study.cells[cell_key("ce-region", 0, 4 * budget.batch_size, "finetune")] = {"score": 1.0}
    assert _pretraining_plan(study) == []
    study.columns = ("knn",)
    study.cells[cell_key("ce-region", 0, 4 * budget.batch_size, "knn")] = {"score": 1.0}
    assert _pretraining_plan(study) == [("ce-region", flags, 0, [2])]


def test_a_milestone_the_run_went_past_without_keeping_is_refused_not_mislabelled(tmp_path):
    """A run already past a milestone whose encoder was not kept (a study from before the run kept them all) would
    resume, stop at once and export its later weights under the earlier milestone's name: one line instead."""
    import argparse

    from transfer.study.cells import pretrain

    budget = BUDGETS["smoke"]
    flags = ["--mask", "random-region"]
    checkpoint = tmp_path / "pretrain" / "ce-region" / "seed0" / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "run.json").write_text(json.dumps({"step": 4, "config": {}}))
    args = argparse.Namespace(num_workers=0, cpu=True, data_cache="off", mixed_precision=None)
    with pytest.raises(StudyError, match="is at step 4, past milestone 2, whose encoder was not kept"):
        pretrain("ce-region", flags, budget, 0, 2, args, tmp_path, tmp_path / "data" / "train")


@pytest.mark.slow
def test_pretrained_row_resumes_its_pretraining_between_milestones(table2, classes, tmp_path):
    """Fine-tuning scores only the last milestone unless --every-milestone, which later adds the earlier cells (and
    the probes, which score every milestone) from the kept snapshots, without pretraining again or touching
    finished cells."""
    out = tmp_path / "study"
    argv = ["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows", "ce-region",
            "--finetune-steps", "1", "--milestones", "1", "2", "--num-workers", "0", "--cpu"]
    assert table2.main([*argv, "--columns", "finetune"]) == 0
    batch = BUDGETS["smoke"].batch_size
    assert set(json.loads((out / "results.json").read_text())["cells"]) == {f"ce-region/seed0/images{2 * batch}/"
                                                                            "finetune"}
    from safetensors.torch import load_file

    step1, step2 = (load_file(out / "pretrain" / "ce-region" / "seed0" / f"encoder-step{s}" / "model.safetensors")
                    for s in (1, 2))  # kept on the way, and really the encoder after one step
    assert step1.keys() == step2.keys() and any(not step1[k].equal(step2[k]) for k in step1)
    log = (out / "pretrain" / "ce-region" / "seed0" / "pretrain.log").read_text()
    assert "resumed from" in log and "at step 1" in log
    argv += ["--columns", "knn", "finetune"]
    assert table2.main(argv) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {f"ce-region/seed0/images{batch}/knn", f"ce-region/seed0/images{2 * batch}/knn",
                          f"ce-region/seed0/images{2 * batch}/finetune"}
    assert (out / "pretrain" / "ce-region" / "seed0" / "pretrain.log").read_text() == log  # no pretraining again

    def earlier_line():
        return next(line for line in (out / "table2.md").read_text().splitlines() if f"| {batch:,} |" in line)

    assert earlier_line().endswith("| – |")  # knn scored, finetune not
    assert table2.main([*argv, "--every-milestone"]) == 0
    again = json.loads((out / "results.json").read_text())["cells"]
    assert set(again) == {*cells, f"ce-region/seed0/images{batch}/finetune"}
    assert all(again[k] == v for k, v in cells.items())
    assert (out / "pretrain" / "ce-region" / "seed0" / "pretrain.log").read_text() == log  # no pretraining again
    assert "–" not in earlier_line()  # the earlier milestone's line of the table now has its fine-tuning score


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


def test_an_ablation_row_is_its_own_cell_keyed_by_its_flags(table2, tmp_path):
    from transfer.study.cells import Study, row_id

    budget = BUDGETS["small"]
    rows = table2.build_rows(table2.parse_args(["--ablate", "ce-aug=--augment rrc+jitter", "--pretrain-override",
                                                "ce-center=--decoder-norm none"]))
    assert rows["ce-aug"] == ["--augment", "rrc+jitter"]
    assert row_id("ce-region", rows["ce-region"], budget) == "ce-region"  # built-in rows keep their keys
    assert row_id("random-timm", None, budget) == "random-timm"
    aug = row_id("ce-aug", rows["ce-aug"], budget)
    assert aug.startswith("ce-aug@") and aug != row_id("ce-aug", ["--augment", "rrc"], budget)
    assert row_id("ce-center", rows["ce-center"], budget).startswith("ce-center@")  # overridden: new cells
    cosine = ["--lr-schedule", "cosine"]
    assert row_id("c", cosine, budget) != row_id("c", cosine, BUDGETS["smoke"])  # the schedule ends elsewhere
    assert row_id("c", ["--lr", "1e-3"], budget) == row_id("c", ["--lr", "1e-3"], BUDGETS["smoke"])
    # cells computed under other flags stay in results.json but are not this study's
    old = cell_key(row_id("ce-aug", ["--augment", "rrc"], budget), 0, 64, "knn")
    new = cell_key(aug, 0, 64, "knn")
    cells = {k: {"row": "ce-aug", "seed": 0, "images": 64, "column": "knn", "score": s}
             for k, s in [(old, 10.0), (new, 20.0)]}
    study = Study(out=tmp_path, budget_name="small", budget=budget, rows={"ce-aug": rows["ce-aug"]},
                  columns=("knn",), seeds=[0], cells=cells)
    assert list(study.current_cells()) == [new]


@pytest.mark.slow
def test_an_ablation_row_pretrains_with_its_flags(table2, classes, tmp_path):
    out = tmp_path / "study"
    flags = "--augment rrc+jitter --lr-schedule cosine --warmup-steps 1 --decoder-norm none --fc-dropout 0"
    assert table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows", "abl",
                        "--ablate", f"abl={flags}", "--columns", "knn", "--milestones", "1", "2",
                        "--num-workers", "0", "--cpu"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 2 and all(k.startswith("abl@") for k in cells)
    assert all(c["flags"] == flags.split() and c["row"] == "abl" for c in cells.values())
    (run_dir,) = (out / "pretrain").iterdir()
    summary = json.loads((run_dir / "seed0" / "train_summary.json").read_text())
    assert summary["config"]["augment"] == "rrc+jitter" and summary["config"]["schedule_steps"] == 2
    assert summary["resumed_from_step"] == 1 and "| abl | " in (out / "table2.md").read_text()


def test_pretraining_runs_side_by_side_with_pretrain_jobs(table2, classes, tmp_path, capsys):
    """Two rows pretrain at once (both start before either ends), then every cell is filled from their snapshots."""
    out = tmp_path / "study"
    assert table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows", "ce-region",
                        "autoencoder", "--columns", "knn", "--milestones", "1", "--num-workers", "0", "--cpu",
                        "--cpu-threads", "1", "--pretrain-jobs", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("pretraining ", "pretrained "))]
    assert [ln.split()[0] for ln in lines] == ["pretraining", "pretraining", "pretrained", "pretrained"], lines
    batch = BUDGETS["smoke"].batch_size
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {f"ce-region/seed0/images{batch}/knn", f"autoencoder/seed0/images{batch}/knn"}


@pytest.mark.parametrize("flag", ["--pretrain-jobs", "--transfer-jobs"])
def test_jobs_must_be_positive(table2, classes, tmp_path, capsys, flag):
    assert table2.main(["--data", str(classes), "--output-dir", str(tmp_path / "o"), flag, "0"]) == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("row,message", [
    ("ce-x=--loss l3", "row 'ce-x': argument --loss: invalid choice: 'l3'"),
    ("ce-x=--bogus 3", "row 'ce-x': unrecognized arguments: --bogus 3"),
    ("ce-x=--mask none --adversarial-weight 0.01", "row 'ce-x': the autoencoder baseline (--mask none) has no hole"),
    ('ce-x=--mask "random-region', "--add-row 'ce-x=--mask \"random-region': No closing quotation"),
])
def test_a_rows_bad_flags_are_refused_before_the_study_starts(table2, classes, tmp_path, capsys, row, message):
    """Not hours later, when the row's pretraining comes up (train.py's own checks, run up front)."""
    out = tmp_path / "o"
    assert table2.main(["--budget", "smoke", "--cpu", "--data", str(classes), "--output-dir", str(out), "--add-row",
                        row]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_transfer_cells_in_their_own_processes_give_the_same_scores(table2, classes, tmp_path):
    """--transfer-jobs 2 runs each cell in a process of its own, two at a time: the same scores as in-process, every
    cell saved, each cell's output in its log."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert _study(table2, classes, serial, "--columns", "knn", "linear") == 0
    assert _study(table2, classes, parallel, "--columns", "knn", "linear", "--transfer-jobs", "2") == 0
    one = json.loads((serial / "results.json").read_text())["cells"]
    two = json.loads((parallel / "results.json").read_text())["cells"]
    assert len(one) == 4 and set(one) == set(two)
    for key in one:
        assert two[key]["score"] == pytest.approx(one[key]["score"]), key
        assert two[key]["stage"] == one[key]["stage"] and two[key]["seed"] == one[key]["seed"]
        log = parallel / "cells" / (key.replace("/", "_") + ".log")
        assert f"{key}: top-1 {one[key]['score']:.1f}" in log.read_text()
    assert not list((parallel / "cells").glob("*.result.json"))
    assert "| random init (timm) | 0 |" in (parallel / "table2.md").read_text()


def test_a_failed_cell_process_leaves_the_others_saved_and_names_its_log(table2, classes, tmp_path):
    from transfer.study.budgets import StudyError as Error
    from transfer.study.cells import Cell, Study, initialisation, run_cells

    budget = BUDGETS["smoke"]
    out = tmp_path / "study"
    prepare_data(classes, out / "data", budget)
    args = table2.parse_args(["--cpu", "--num-workers", "0", "--cpu-threads", "1"])
    study = Study(out=out, budget_name="smoke", budget=budget, rows={"random-timm": None}, columns=("knn",),
                  seeds=[0])
    good = initialisation("random-timm", budget, 0, out / "pretrain" / "random-timm" / "seed0" / "init")
    cells = [Cell("random-timm/seed0/images0/knn", "random-timm", None, 0, 0, "knn", good),
             Cell("broken/seed0/images0/knn", "broken", None, 0, 0, "knn", out / "no-such-encoder")]
    with pytest.raises(Error, match=r"broken/seed0/images0/knn failed \(exit 1\); see .*broken_seed0_images0_knn\.log"):
        run_cells(study, args, out / "data", cells, jobs=2, log=lambda s: None)
    saved = json.loads((out / "results.json").read_text())["cells"]
    assert list(saved) == ["random-timm/seed0/images0/knn"] and saved["random-timm/seed0/images0/knn"]["score"] > 0


def test_prepare_only_writes_the_split_and_nothing_else(table2, classes, tmp_path, capsys):
    out = tmp_path / "study"
    assert table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--prepare-only"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["data"]
    val = BUDGETS["smoke"].val_per_class
    assert all(len(list((out / "data" / "val" / c).iterdir())) == val for c in ("cat", "dog", "owl"))
    assert f"{3 * val} val images of 3 classes" in capsys.readouterr().out


def test_pretraining_reads_one_decoded_cache_with_data_cache_on(table2, classes, tmp_path):
    """The study decodes the images once; train.py accepts that cache (a mismatch would rebuild it: a new file)."""
    out = tmp_path / "study"

    def study(*milestones):
        return table2.main(["--budget", "smoke", "--data", str(classes), "--output-dir", str(out), "--rows",
                            "ce-region", "--columns", "knn", "--milestones", *milestones, "--num-workers", "0",
                            "--cpu", "--cpu-threads", "1", "--data-cache", "on"])

    assert study("1") == 0
    cache = out / "data" / f"cache-{BUDGETS['smoke'].image_size}px.npy"
    summary = json.loads((out / "pretrain" / "ce-region" / "seed0" / "train_summary.json").read_text())
    assert summary["config"]["data_cache"] == str(cache)
    built = cache.stat().st_mtime_ns, cache.stat().st_ino
    assert study("1", "2") == 0  # the study checks the cache again, and train.py resumes from it
    assert (cache.stat().st_mtime_ns, cache.stat().st_ino) == built
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
