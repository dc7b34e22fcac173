"""The training script end to end, run as users run it (subprocesses), on generated images."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from ce_pretrain import ContextEncoder
from ce_pretrain.checkpoint import check_resumable, latest_checkpoint
from ce_pretrain.config import build_parser, resolve_config
from ce_pretrain.train import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "ce_pretrain" / "train.py")
TINY = ["--backbone", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0", "--log-every", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*args, check=True, launcher=(sys.executable,), timeout=300):
    proc = subprocess.run([*launcher, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out):
    with open(out / "logs" / "ce_pretrain" / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_short_run_learns_and_outputs_load_back(image_folder, tmp_path):
    out = tmp_path / "run"
    run("--data", str(image_folder), "--output-dir", str(out), "--max-steps", "12", "--lr", "1e-3",
        "--checkpoint-every", "5", *TINY)
    curve = losses(out)
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    model = ContextEncoder.from_pretrained(str(out))
    assert model.backbone_name == "resnet18" and model.image_size == 64
    enc = timm.create_model(f"local-dir:{out / 'timm-encoder'}", pretrained=True, num_classes=3)
    own = model.encoder.model.state_dict()
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in own.items())
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "step_00000005.png").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped_files"] == [] and summary["images_per_second"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010", "step_00000012"]


def test_killed_run_resumes_to_identical_weights(image_folder, tmp_path):
    common = ["--data", str(image_folder), "--checkpoint-every", "2", "--seed", "7", *TINY]
    ref = tmp_path / "ref"
    run(*common, "--output-dir", str(ref), "--max-steps", "6")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, *common, "--output-dir", str(out), "--max-steps", "100000"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step_00000004":
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a save interrupted by the kill leaves a temporary folder behind; resuming must ignore it
    (out / "checkpoints" / ".tmp-step_00000099").mkdir(exist_ok=True)
    resumed = run(*common, "--output-dir", str(out), "--max-steps", "6", "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert losses(ref)[-2:] == losses(out)[-2:]


ABLATION = ["--augment", "rrc+jitter", "--lr-schedule", "cosine", "--warmup-steps", "2", "--schedule-steps", "6",
            "--decoder-norm", "none", "--fc-dropout", "0.2", "--lr", "1e-3", "--encoder-init", "rescale"]


def _same_weights(a_dir, b_dir):
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ablation_knobs_resume_to_identical_weights(image_folder, tmp_path):
    from ce_pretrain.schedule import lr_factor

    common = ["--data", str(image_folder), "--checkpoint-every", "2", "--seed", "3", "--max-steps", "6", *TINY,
              *ABLATION]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    first = run(*common, "--output-dir", str(ref))
    assert "rescaled on 12 training images" in first.stdout  # --encoder-init rescale, at step 0 only
    proc = run(*common, "--output-dir", str(resumed), "--resume", str(ref / "checkpoints" / "step_00000004"))
    assert "at step 4" in proc.stdout + proc.stderr and "rescaled on" not in proc.stdout
    assert _same_weights(ref, resumed), "resumed weights differ from the uninterrupted run"
    assert losses(ref)[-2:] == losses(resumed)
    with open(ref / "logs" / "ce_pretrain" / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([1e-3 * lr_factor(t, "cosine", 2, 6) for t in range(6)])
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] < 2e-4
    model = ContextEncoder.from_pretrained(str(ref))
    assert model.config["decoder_norm"] == "none" and model.config["dropout"] == 0.2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())
    config = json.loads((ref / "train_summary.json").read_text())["config"]
    assert config["augment"] == "rrc+jitter" and config["encoder_init"] == "rescale"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["loader", "data-cache"])
def test_ablation_run_extended_in_stages_equals_the_uninterrupted_one(image_folder, tmp_path, path):
    """As the feature study extends a run milestone by milestone: --max-steps 4, then --resume to 6, with the
    schedule's length fixed by --schedule-steps; on the PIL loader and on the --data-cache device path."""
    common = ["--data", str(image_folder), "--checkpoint-every", "2", "--seed", "3", *TINY, *ABLATION]
    if path == "data-cache":
        common += ["--data-cache", str(tmp_path / "cache.npy")]
    ref, staged = tmp_path / "ref", tmp_path / "staged"
    run(*common, "--output-dir", str(ref), "--max-steps", "6")
    run(*common, "--output-dir", str(staged), "--max-steps", "4")
    resumed = run(*common, "--output-dir", str(staged), "--max-steps", "6", "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert _same_weights(ref, staged), "resumed weights differ from the uninterrupted run"
    assert losses(ref)[-2:] == losses(staged)[-2:]


def test_bad_files_are_skipped_and_reported(image_folder, tmp_path):
    (image_folder / "zero.jpg").write_bytes(b"")
    (image_folder / "sub").mkdir()
    (image_folder / "sub" / "notes.png").write_text("hello")
    data = (image_folder / "img_001.png").read_bytes()
    (image_folder / "sub" / "cut.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "run"
    proc = run("--data", str(image_folder), "--output-dir", str(out), "--max-steps", "8", *TINY)
    summary = json.loads((out / "train_summary.json").read_text())
    assert {Path(p).name for p in summary["skipped_files"]} == {"zero.jpg", "notes.png", "cut.png"}
    assert "skipped 3 unreadable" in proc.stdout + proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--backbone", "resnet5O"], "did you mean"),
    (["--preset", "inpainting", "--mask", "random-region"], "predicts only the"),
    (["--mask", "center", "--mask-shapes", "."], "only applies to --mask random-region"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--push-to-hub"], "--hub-model-id"),
    (["--resume", "/no/checkpoint"], "does not exist"),
    (["--resume", __file__], "is a file, not a checkpoint folder"),
    (["--log-with", "tensorbord"], "'tensorbord' is not a tracker: csv, "),
    (["--streaming"], "--streaming applies to Hugging Face datasets"),
    (["--fc-dropout", "1"], "--fc-dropout must be in [0, 1)"),
    (["--high-pass-weight", "-0.5"], "--high-pass-weight must be a finite number ≥ 0"),
    (["--preset", "inpainting", "--fc-dropout", "0"], "has no dropout"),
    (["--warmup-steps", "-1"], "--warmup-steps must be ≥ 0"),
    (["--lr-schedule", "cosine", "--warmup-steps", "10", "--max-steps", "10"], "leaves no steps for the cosine"),
    (["--schedule-steps", "0"], "--schedule-steps must be at least 1"),
])
def test_bad_flags_stop_at_once_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("ce_pretrain/train.py: error:")
    assert not out.exists()  # nothing was built or written


@pytest.mark.parametrize("args", [["--augment", "mixup"], ["--lr-schedule", "step"], ["--decoder-norm", "layer"],
                                  ["--warmup-steps", "ten"], ["--encoder-init", "kaiming"]])
def test_bad_choices_are_one_line_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--output-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("ce_pretrain/train.py: error:")
    assert args[0] in err and not (tmp_path / "never").exists()


def test_mask_shapes_without_masks_is_one_line_and_leaves_no_logs(image_folder, tmp_path, capsys):
    (tmp_path / "no-masks").mkdir()
    out = tmp_path / "run"
    assert main(["--data", str(image_folder), "--mask-shapes", str(tmp_path / "no-masks"), "--output-dir", str(out),
                 "--max-steps", "1", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mask-shapes: no object masks found" in err
    assert not (out / "logs").exists()  # the same command without the bad flag is not refused for a used folder


def test_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_resume_of_another_run_is_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    run("--data", str(image_folder), "--output-dir", str(out), "--max-steps", "2", *TINY)
    args = ["--data", str(image_folder), "--output-dir", str(out), "--max-steps", "4", "--resume", *TINY]
    args[args.index("resnet18")] = "resnet34"
    assert main(args) == 2
    assert "belongs to another run" in capsys.readouterr().err
    args[args.index("resnet34")] = "resnet18"
    assert main([*args, "--decoder-norm", "none"]) == 2  # another decoder: its weights cannot load
    assert "decoder_norm: checkpoint 'batch' vs now 'none'" in capsys.readouterr().err
    # a checkpoint written before a key existed ran with that key's default: it still resumes
    ckpt = latest_checkpoint(out)
    run_json = json.loads((ckpt / "run.json").read_text())
    del run_json["config"]["decoder_norm"]
    (ckpt / "run.json").write_text(json.dumps(run_json))
    check_resumable(ckpt, resolve_config(build_parser().parse_args(args)))


def test_resume_with_another_recipe_is_refused_unless_asked_and_then_recorded(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(image_folder), "--output-dir", str(out), *TINY]
    run(*base, "--max-steps", "2")
    changed = [*base, "--max-steps", "4", "--resume", "--lr", "1e-2", "--loss", "l1"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--loss 'l2' → 'l1'; --lr 0.0001 → 0.01" in err, err
    assert "--allow-recipe-change" in err and latest_checkpoint(out).name == "step_00000002"
    assert main([*base, "--max-steps", "4", "--allow-recipe-change"]) == 2
    assert "only applies when resuming" in capsys.readouterr().err

    proc = run(*changed, "--allow-recipe-change")
    assert "with a changed recipe: --loss 'l2' → 'l1'; --lr 0.0001 → 0.01" in proc.stdout
    record = [{"step": 2, "changes": {"loss": ["l2", "l1"], "lr": [1e-4, 1e-2]}}]
    assert json.loads((out / "train_summary.json").read_text())["recipe_changes"] == record
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "run.json").read_text())["state"]["recipe_changes"] == record
    assert "from step 2: --loss 'l2' → 'l1'; --lr 0.0001 → 0.01" in (out / "README.md").read_text()  # the model card
    # the new rate is the one the optimiser used, not the checkpoint's (its param groups came back with it)
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert [g["lr"] for g in opt["param_groups"]] == [1e-2]

    # resumed again with the same flags: nothing to change, and nothing to train at the checkpoint's step
    proc = run(*changed, "--allow-recipe-change")
    assert "nothing to train" in proc.stdout and "changed recipe" not in proc.stdout
    assert json.loads((out / "train_summary.json").read_text())["recipe_changes"] == record

    # a checkpoint without its weights: one line naming the missing file (not accelerate's pickle fallback)
    (ckpt / "model.safetensors").unlink()
    assert main([*changed[:-4], "--max-steps", "6", "--resume", str(ckpt), "--lr", "1e-2", "--loss", "l1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is incomplete (model.safetensors missing)" in err, err


def test_inpainting_preset_joint_loss_bf16(image_folder, tmp_path):
    out = tmp_path / "inp"
    run("--preset", "inpainting", "--data", str(image_folder), "--image-size", "64", "--batch-size", "4",
        "--max-steps", "3", "--num-workers", "0", "--log-every", "1", "--mixed-precision", "bf16",
        "--output-dir", str(out))
    with open(out / "logs" / "ce_pretrain" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["loss/adversarial"]) > 0 and float(r["loss/discriminator"]) > 0 for r in rows)
    model = ContextEncoder.from_pretrained(str(out))
    assert model.pred_size == 32 and model.overlap == 7 and model.bottleneck[1].out_features == 4000


def test_divergence_is_detected_and_reported(image_folder, tmp_path):
    proc = run("--data", str(image_folder), "--output-dir", str(tmp_path / "o"), "--max-steps", "50",
               "--lr", "1e30", "--max-nonfinite-steps", "2", *TINY, check=False)
    assert proc.returncode == 1
    assert "non-finite" in proc.stderr.splitlines()[-1]


def test_two_process_ddp_on_cpu(image_folder, tmp_path):
    out = tmp_path / "ddp"
    run("--data", str(image_folder), "--output-dir", str(out), "--max-steps", "3", *TINY,
        launcher=(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    # each process drew its own images: 3 steps × 4 images × 2 processes
    assert summary["images_per_second"] * summary["seconds"] == pytest.approx(24, rel=0.02)
    ContextEncoder.from_pretrained(str(out))


def test_streamed_dataset_trains(image_folder, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [datasets] extra is not installed")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in sorted(image_folder.iterdir())]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    proc = run("--data", str(tmp_path / "saved"), "--streaming", "--output-dir", str(out), "--max-steps", "4", *TINY)
    assert "streamed" in proc.stdout
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_two_processes_agree_when_to_stop(image_folder, tmp_path):
    """--max-time under DDP: the ranks' clocks differ, the all-reduce every STOP_SYNC_EVERY steps makes them stop
    after the same step (a rank stopping alone would hang the other in its next collective)."""
    from ce_pretrain.engine import STOP_SYNC_EVERY

    out = tmp_path / "ddp"
    run("--data", str(image_folder), "--output-dir", str(out), "--max-steps", "100000", "--max-time", "1", *TINY,
        launcher=(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "--max-time" and summary["steps"] == STOP_SYNC_EVERY
    assert latest_checkpoint(out).name == f"step_{STOP_SYNC_EVERY:08d}"
