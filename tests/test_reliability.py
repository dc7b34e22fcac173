"""A run is never lost and bad input never shows a traceback: signals, time budgets, output folders, untrusted
checkpoints, and the checks made before any work (issue 12's cases, one test each)."""

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ce_pretrain import ContextEncoder
from ce_pretrain.checkpoint import LOCK_NAME, RunLock, latest_checkpoint, prepare_output_dir
from ce_pretrain.cli import main as cli_main
from ce_pretrain.config import ConfigError, TrainConfig, parse_duration
from ce_pretrain.train import main as train_main

TINY = ["--backbone", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
        "--log-with", "none"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def train(*args, **popen):
    """``python -m ce_pretrain train ...`` as a process (signals need one)."""
    return subprocess.Popen([sys.executable, "-m", "ce_pretrain", "train", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_line_error(err: str, prog: str = "ce-pretrain") -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"{prog}"), err
    return lines[0]


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write to, even as root (sysfs), or a chmod'ed one for other users."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    for folder in (Path("/sys"), Path("/proc/self")):
        try:
            (folder / ".ce-probe").mkdir()
        except OSError:
            yield folder
            return
        (folder / ".ce-probe").rmdir()
    pytest.skip("no folder here is read-only for root")


# ------------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_saves_checkpoint_and_model_and_resume_equals_uninterrupted(image_folder, tmp_path, sig, code):
    common = ["--data", image_folder, "--seed", "3", "--checkpoint-every", "100000", *TINY]
    out = tmp_path / "run"
    proc = train(*common, "--output-dir", out, "--max-steps", "100000", "--log-with", "csv")
    deadline = time.time() + 240
    metrics = out / "logs" / "ce_pretrain" / "metrics.csv"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:  # header + 2 steps
        assert proc.poll() is None and time.time() < deadline, "".join(proc.communicate())
        time.sleep(0.2)
    proc.send_signal(sig)
    rc, stdout, err = finish(proc)
    assert rc == code, err[-2000:]
    assert "Traceback" not in err
    ckpt = latest_checkpoint(out)
    stopped_at = int(ckpt.name.split("_")[1])
    assert stopped_at >= 2 and (out / "model.safetensors").is_file() and (out / "timm-encoder").is_dir()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == signal.Signals(sig).name and summary["steps"] == stopped_at
    assert "--resume" in stdout + err and not (out / LOCK_NAME).exists()

    target = stopped_at + 2
    ref = tmp_path / "ref"
    procs = [train(*common, "--output-dir", ref, "--max-steps", target),
             train(*common, "--output-dir", out, "--max-steps", target, "--resume")]
    for p in procs:
        rc, _, err = finish(p)
        assert rc == 0, err[-2000:]
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"


def test_max_time_stops_cleanly_with_a_model(image_folder, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = finish(train("--data", image_folder, "--output-dir", out, "--max-steps", "100000",
                                   "--max-time", "1s", *TINY))
    assert rc == 0, err[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "--max-time" and 1 <= summary["steps"] < 100000
    assert latest_checkpoint(out).name == f"step_{summary['steps']:08d}"
    assert ContextEncoder.from_pretrained(str(out)).image_size == 64
    assert "--resume" in stdout


@pytest.mark.parametrize("text,seconds", [("90", 90), ("45s", 45), ("20m", 1200), ("1h30m", 5400),
                                          ("1h30m15s", 5415), ("0.5h", 1800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "-5", "0", "1h-3m", "inf"])
def test_bad_durations(text):
    with pytest.raises(ConfigError, match="--max-time"):
        parse_duration(text)


# ------------------------------------------------------------------------------------------ output folders
def test_non_empty_output_dir_is_refused_without_resume_or_overwrite(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier run")
    assert train_main(["--data", str(image_folder), "--output-dir", str(out), *TINY], prog="ce-pretrain train") == 2
    line = one_line_error(capsys.readouterr().err)
    assert "not empty" in line and "--resume" in line and "--overwrite" in line
    assert (out / "model.safetensors").read_bytes() == b"an earlier run"
    assert train_main(["--output-dir", str(out), "--resume", "--overwrite", *TINY], prog="ce-pretrain train") == 2
    assert "pass one of them" in capsys.readouterr().err


def test_overwrite_deletes_the_old_runs_checkpoints_only(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000900").mkdir(parents=True)
    (out / "checkpoints" / "step_00000900" / "run.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    lock = prepare_output_dir(TrainConfig(output_dir=str(out), overwrite=True))
    try:
        assert latest_checkpoint(out) is None and not (out / "model.safetensors").exists()
        assert (out / "notes.txt").read_text() == "mine" and (out / LOCK_NAME).is_file()
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match="another run"):
        RunLock(tmp_path).acquire()
    first.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    taken = RunLock(tmp_path).acquire()  # stale: its process is gone
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    taken.release()


def test_unwritable_output_dir_is_refused_before_any_work(image_folder, readonly_dir, capsys):
    out = readonly_dir / "ce-run"
    assert train_main(["--data", str(image_folder), "--output-dir", str(out), *TINY], prog="ce-pretrain train") == 2
    assert "not writable" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------- untrusted checkpoints
class _RunsCommand:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def fake_checkpoint(image_folder: Path, out: Path) -> tuple[Path, list[str]]:
    """A checkpoint folder whose run.json matches the flags returned (all that is read before a resume starts)."""
    from ce_pretrain.config import build_parser, resolve_config

    args = ["--data", str(image_folder), "--output-dir", str(out), "--max-steps", "3", *TINY]
    cfg = resolve_config(build_parser().parse_args(args))
    ckpt = out / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "run.json").write_text(json.dumps({"step": 2, "config": dataclasses.asdict(cfg)}))
    return ckpt, args


def test_crafted_custom_pickle_is_refused_unread(image_folder, tmp_path, capsys):
    ckpt, args = fake_checkpoint(image_folder, tmp_path / "run")
    marker = tmp_path / "pwned"
    with open(ckpt / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_RunsCommand(marker), f)
    assert train_main([*args, "--resume", str(ckpt)], prog="ce-pretrain train") == 2
    assert "refusing to unpickle" in one_line_error(capsys.readouterr().err)
    assert not marker.exists()


def test_corrupt_run_json_is_one_line(image_folder, tmp_path, capsys):
    ckpt, args = fake_checkpoint(image_folder, tmp_path / "run")
    (ckpt / "run.json").write_text('{"step": 2, "conf')
    assert train_main([*args, "--resume", str(ckpt)], prog="ce-pretrain train") == 2
    assert "corrupt" in one_line_error(capsys.readouterr().err)
    assert train_main([*args, "--resume"], prog="ce-pretrain train") == 2  # latest: the same file
    assert "corrupt" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("content", [b"", b"\x80\x02not a pickle"])
def test_damaged_random_states_are_refused_not_skipped(image_folder, tmp_path, capsys, content):
    """accelerate only logs (INFO) when it cannot read them, and the resumed run would draw other masks."""
    ckpt, args = fake_checkpoint(image_folder, tmp_path / "run")
    (ckpt / "random_states_0.pkl").write_bytes(content)
    assert train_main([*args, "--resume", str(ckpt)], prog="ce-pretrain train") == 2
    assert "random_states_0.pkl is damaged" in one_line_error(capsys.readouterr().err)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    from conftest import write_images

    root = tmp_path_factory.mktemp("ckpt")
    write_images(root / "images")
    rc, _, err = finish(train("--data", root / "images", "--output-dir", root / "run", "--max-steps", "2", *TINY))
    assert rc == 0, err[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("where", ["optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_accelerate_state_never_runs(checkpointed_run, tmp_path, where):
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run / "run", run)
    ckpt = latest_checkpoint(run)
    marker = tmp_path / "pwned"
    with open(ckpt / where, "wb") as f:
        pickle.dump(_RunsCommand(marker), f)
    rc, _, err = finish(train("--data", checkpointed_run / "images", "--output-dir", run, "--max-steps", "3",
                              "--resume", ckpt, *TINY))
    assert not marker.exists(), "the crafted pickle was executed"
    # torch.load(weights_only=True) rejects it: one line, nothing run (the random states are read that way before
    # accelerate, which would go on without them)
    assert rc == 2 and "cannot resume" in one_line_error(err, "ce-pretrain train")


def test_a_run_killed_while_re_saving_its_last_checkpoint_resumes_from_it(image_folder, tmp_path):
    """The last save of a run resumed at its final step re-saves that step; a SIGKILL there (its two renames:
    atomic.replace_dir) used to find the checkpoint already deleted and the next --resume starting from scratch."""
    out = tmp_path / "run"
    common = ["--data", image_folder, "--output-dir", out, "--keep-checkpoints", "1", "--seed", "3", *TINY]
    rc, _, err = finish(train(*common, "--max-steps", "2"))
    assert rc == 0, err[-2000:]
    root = latest_checkpoint(out).parent
    # the state such a kill leaves: the checkpoint renamed aside, the new copy of it not yet in place
    os.rename(root / "step_00000002", root / ".old-step_00000002")
    shutil.copytree(root / ".old-step_00000002", root / ".tmp-step_00000002")
    (root / ".tmp-step_00000002" / "run.json").unlink()
    assert latest_checkpoint(out) == root / ".old-step_00000002"
    rc, stdout, err = finish(train(*common, "--max-steps", "3", "--resume"))
    assert rc == 0, err[-2000:]
    assert "starting from scratch" not in stdout + err
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]  # nothing hidden left behind


# --------------------------------------------------------------------------------------- checks up front
@pytest.mark.parametrize("args,message", [
    (["--backbone", "alexnet", "--image-size", "64"], "too small for alexnet"),
    (["--backbone", "vit_tiny_patch16_224", "--image-size", "64"], "takes 224×224 images only"),
    (["--image-size", "5000", "--batch-size", "256"], "GiB"),
    (["--data", "someone/some-dataset"], "Hugging Face dataset 'someone/some-dataset'"),
    (["--data", "./no/such/folder"], "does not exist"),
    (["--max-time", "soon"], "not a duration"),
])
def test_checks_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert train_main([*args, "--output-dir", str(out)], prog="ce-pretrain train") == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_all_broken_data_folder_is_refused(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"x{i}.jpg").write_bytes(b"not an image")
    assert train_main(["--data", str(tmp_path / "d"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "can be read as an image" in one_line_error(capsys.readouterr().err, "ce_pretrain/train.py")


def test_default_image_size_is_the_backbones_own():
    assert ContextEncoder(backbone="vit_tiny_patch16_224").image_size == 224
    assert ContextEncoder(backbone="alexnet").image_size == 227
    assert ContextEncoder(backbone="dcgan_encoder", backbone_kwargs=dict(width=8)).image_size == 128


def test_from_pretrained_says_which_path_was_meant(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder: './runs/nope'"):
        ContextEncoder.from_pretrained("./runs/nope")
    with pytest.raises(FileNotFoundError, match="no such folder: 'runs/nope', and no Hugging Face Hub model"):
        ContextEncoder.from_pretrained("runs/nope")  # shaped like a Hub id: both are named
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ContextEncoder.from_pretrained(tmp_path / "empty")


def test_truncated_weights_name_the_file(tmp_path, capsys):
    from ce_pretrain.model import IncompatibleCheckpointError

    ContextEncoder(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8)).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompatibleCheckpointError, match="model.safetensors"):
        ContextEncoder.from_pretrained(tmp_path)
    assert cli_main(["export", "--model", str(tmp_path), "--out", str(tmp_path.parent / "enc")]) == 2
    assert "model.safetensors" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- ce-pretrain
@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    ContextEncoder(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8)).save_pretrained(
        tmp_path / "model")
    return tmp_path / "model"


def test_export_never_writes_over_its_source_or_another_model(model_dir, tmp_path, capsys):
    before = (model_dir / "model.safetensors").read_bytes()
    assert cli_main(["export", "--model", str(model_dir), "--out", str(model_dir), "--overwrite"]) == 2
    assert "own folder" in one_line_error(capsys.readouterr().err)
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert cli_main(["export", "--model", str(model_dir), "--out", str(tmp_path / "enc")]) == 0
    capsys.readouterr()
    assert cli_main(["export", "--model", str(model_dir), "--out", str(tmp_path / "enc")]) == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert cli_main(["export", "--model", str(model_dir), "--out", str(tmp_path / "enc"), "--overwrite"]) == 0


def test_mistyped_model_path_is_no_hub_error(capsys):
    assert cli_main(["export", "--model", "runs/nope", "--out", "/tmp/never-written"]) == 2
    assert "no such folder: 'runs/nope'" in one_line_error(capsys.readouterr().err)


def test_read_only_outputs_of_export_and_evaluate(model_dir, readonly_dir, tmp_path, capsys):
    assert cli_main(["export", "--model", str(model_dir), "--out", str(readonly_dir / "enc")]) == 2
    assert "not writable" in one_line_error(capsys.readouterr().err)
    (tmp_path / "data").mkdir()
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "data"),
                     "--json", str(readonly_dir / "eval.json")]) == 2
    assert "not writable" in one_line_error(capsys.readouterr().err)
