"""Folders put in place and deleted so that a kill at any moment (``kill -9``: no handler runs) never leaves one
that looks complete and is not (``ce_pretrain.atomic``; found by killing runs at random moments, 2026-12-05)."""

import os

import pytest

from ce_pretrain import atomic
from ce_pretrain.atomic import complete_dirs, remove_dir, remove_leftovers, replace_dir


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised runs, and no ``except Exception`` catches it."""


def checkpoint(folder, step, marker="run.json"):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(f"weights {step}")
    (folder / "optimizer.bin").write_text(f"moments {step}")
    (folder / marker).write_text(f"step {step}")  # written last
    return folder


def rmtree_weights_first(path, ignore_errors=False):
    """The deletion order some filesystems list (creation order puts the marker last), killed before the end."""
    if not os.path.exists(path):
        return
    for file in sorted(os.listdir(path), key=lambda name: name == "run.json"):
        os.remove(os.path.join(path, file))
        if file != "run.json" and len(os.listdir(path)) == 1:
            raise Killed


def test_a_kill_mid_delete_never_leaves_a_marker_without_its_weights(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "step_1", 1)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree_weights_first)
    with pytest.raises(Killed):
        remove_dir(ckpt)
    monkeypatch.undo()
    # before: shutil.rmtree(step_1) left step_1/run.json alone, a 'complete' checkpoint without weights
    assert not ckpt.exists() and complete_dirs(tmp_path, "step_", "run.json") == {}
    remove_leftovers(tmp_path)
    assert os.listdir(tmp_path) == []


def test_replace_keeps_a_whole_copy_at_every_moment(tmp_path, monkeypatch):
    old, new = checkpoint(tmp_path / "step_4", "old"), checkpoint(tmp_path / ".tmp-step_4", "new")
    renames = []

    def replace_then_die(src, dst):
        if renames:
            raise Killed  # between the two renames: the old checkpoint aside, the new one not yet in place
        renames.append((src, dst))
        os.rename(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        replace_dir(new, old)
    monkeypatch.undo()
    # before: the old step_4 was deleted first, and a kill then left only .tmp-step_4, which no reader looks at
    found = complete_dirs(tmp_path, "step_", "run.json")
    assert list(found) == ["step_4"] and (found["step_4"] / "model.safetensors").read_text() == "weights old"
    remove_leftovers(tmp_path)  # the next save puts the copy back and drops the unfinished one
    assert sorted(os.listdir(tmp_path)) == ["step_4"]
    assert (tmp_path / "step_4" / "model.safetensors").read_text() == "weights old"

    replace_dir(checkpoint(tmp_path / ".tmp-step_4", "new"), tmp_path / "step_4")
    assert sorted(os.listdir(tmp_path)) == ["step_4"]
    assert (tmp_path / "step_4" / "model.safetensors").read_text() == "weights new"


def test_complete_dirs_prefers_the_folder_to_its_copy_and_skips_unfinished_ones(tmp_path):
    checkpoint(tmp_path / "step-000002", 2, "state.json")
    checkpoint(tmp_path / ".old-step-000002", 1, "state.json")
    (tmp_path / "step-000003").mkdir()  # no marker: unfinished
    checkpoint(tmp_path / ".step-000004.tmp", 4, "state.json")  # a temporary folder is never a checkpoint
    assert complete_dirs(tmp_path, "step-", "state.json") == {"step-000002": tmp_path / "step-000002"}
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step-000002", "step-000003"]
    assert complete_dirs(tmp_path / "missing", "step-", "state.json") == {}
