"""transfer.common.engine: the fine-tuning loop every transfer task runs on (CPU, generated data)."""

import csv
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from transfer.common.cli import RunInterrupted, UsageError
from transfer.common.engine import EngineConfig, Task, TrainingDiverged, fit
from transfer.common.sampler import ResumableRandomSampler

STEPS = 12  # 24 items in batches of 5: five batches an epoch, so the run crosses two epoch boundaries


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        self.computed_in = h.dtype  # accelerate hands the output back in float32 whatever the autocast
        return self.fc(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1))


def _weights(model: nn.Module, device=None) -> dict:
    return {"weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()}


def make_task(hook=None, lr: float = 0.05, **kwargs) -> Task:
    """A seeded task whose loss draws noise from the global generator, as random augmentations do."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 8, 8), torch.randint(0, 2, (24,)))
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    calls = []

    def loss(model, batch):
        images, labels = batch
        calls.append(images.shape)
        if hook:
            hook(len(calls))
        return F.cross_entropy(model(images + 0.1 * torch.randn_like(images)), labels)

    task = Task(name="tiny", model=model, optimizer=optimizer, train_set=data, batch_size=5, loss=loss,
                evaluate=_weights, max_steps=STEPS, config={"lr": lr, "steps": STEPS},
                scheduler=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total),
                **kwargs)
    return task


def engine(tmp_path, **kwargs) -> EngineConfig:
    return EngineConfig(**{"output_dir": str(tmp_path), "progress": False, "log_every": 2, "checkpoint_every": 0,
                           **kwargs})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit(make_task(), engine(tmp_path_factory.mktemp("full")))


def test_same_numbers_as_a_hand_written_loop(uninterrupted):
    """The loop the three transfer tasks had before the engine: shuffled DataLoader, zero_grad/backward/step."""
    task = make_task()
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=5, shuffle=True)
    scheduler = task.scheduler(task.optimizer, STEPS)
    step, losses = 0, []
    while step < STEPS:
        for batch in loader:
            loss = task.loss(task.model, batch)
            task.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            task.optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= STEPS:
                break
    assert uninterrupted["weights"] == _weights(task.model)["weights"]
    assert uninterrupted["final_loss"] == pytest.approx(sum(losses[-10:]) / 10, rel=1e-12)
    assert uninterrupted["complete"] and uninterrupted["steps"] == STEPS


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch, and at the end of the first epoch
def test_sigterm_saves_and_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_at):
    def hook(call):
        if call == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted) as stop:
        fit(make_task(hook), engine(tmp_path))
    assert stop.value.exit_code == 143 and "--resume" in str(stop.value)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == stop_at and not saved["complete"]
    assert (tmp_path / "checkpoints" / f"step-{stop_at:06d}" / "state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    with pytest.raises(UsageError, match="holds an earlier run"):
        fit(make_task(), engine(tmp_path))
    resumed = fit(make_task(), engine(tmp_path, resume="latest"))
    assert resumed["weights"] == uninterrupted["weights"]
    assert resumed["final_loss"] == uninterrupted["final_loss"]
    assert not (tmp_path / "checkpoints").exists()
    assert fit(make_task(), engine(tmp_path, resume="latest")) == resumed  # finished: nothing run again


def test_max_time_stops_cleanly_and_resumes(tmp_path, uninterrupted):
    task = make_task(hook=lambda call: time.sleep(0.05))
    first = fit(task, engine(tmp_path, max_time=0.01))
    assert not first["complete"] and first["steps"] == 1 and "mAP" not in first
    resumed = fit(make_task(), engine(tmp_path, resume="latest"))
    assert resumed["weights"] == uninterrupted["weights"]


def test_periodic_checkpoint_resume_and_refusals(tmp_path, uninterrupted):
    def crash(call):
        if call == 8:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        fit(make_task(crash), engine(tmp_path, checkpoint_every=3))
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-000006"]  # only the newest is kept; no half-written folder
    with pytest.raises(UsageError, match="--lr was 0.05, now 0.1"):
        fit(make_task(lr=0.1), engine(tmp_path, resume="latest"))
    for name in ("state.json", "optimizer.safetensors"):
        assert not list(tmp_path.rglob("*.pkl")) and (tmp_path / "checkpoints/step-000006" / name).is_file()
    assert fit(make_task(), engine(tmp_path, resume="latest"))["weights"] == uninterrupted["weights"]


def test_resume_refuses_a_broken_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        fit(make_task(), engine(tmp_path / "out", resume=str(tmp_path / "ckpt")))


def test_mixed_precision_reaches_the_forward(tmp_path):
    task = make_task()
    result = fit(task, engine(tmp_path / "bf16", mixed_precision="bf16"))
    assert result["mixed_precision"] == "bf16" and task.model.computed_in == torch.bfloat16
    task = make_task()  # another precision in the same process
    result = fit(task, engine(tmp_path / "no", mixed_precision="no"))
    assert result["mixed_precision"] == "no" and task.model.computed_in == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="fp16 needs a GPU"):
            fit(make_task(), engine(tmp_path / "fp16", mixed_precision="fp16"))


def test_logs_and_progress(tmp_path, capsys):
    fit(make_task(), EngineConfig(output_dir=str(tmp_path), log_every=4, checkpoint_every=0,
                                  log_with=("csv", "tensorboard")))
    assert list((tmp_path / "logs" / "tiny").glob("events.out.tfevents.*"))
    with open(tmp_path / "logs" / "tiny" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    lrs = [float(r["lr"]) for r in rows]
    assert all(float(r["loss"]) > 0 for r in rows) and lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]
    err = capsys.readouterr().err
    assert "12/12" in err and "loss=" in err and "step/s" in err and "img_s=" in err
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_divergence_is_one_line(tmp_path):
    with pytest.raises(TrainingDiverged, match="loss became (nan|inf) by step 2"):
        fit(make_task(lr=float("inf")), engine(tmp_path))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    def poison(call):
        if call == 4:
            with torch.no_grad():
                task.model.fc.bias.fill_(float("nan"))

    task = make_task(poison)
    with pytest.raises(TrainingDiverged, match="weights became NaN .* by step 4.*still finite"):
        fit(task, engine(tmp_path, checkpoint_every=2, log_every=100))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


def test_sampler_matches_random_sampler_and_splits_ranks():
    torch.manual_seed(3)
    expected = list(torch.utils.data.RandomSampler(range(10)))
    torch.manual_seed(3)
    sampler = ResumableRandomSampler(10)
    assert list(sampler) == expected
    sampler.resume(0, sampler.epoch_seed, 4)
    assert list(sampler) == expected[4:]
    ranks = [list(ResumableRandomSampler(10, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks) and {i for r in ranks for i in r} == set(range(10))


def test_sigterm_to_a_process_exits_143_with_a_checkpoint(tmp_path):
    marker, out = tmp_path / "marker", tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import argparse, pathlib, sys, time
        from test_transfer_engine import engine, make_task
        from transfer.common.cli import run_main
        from transfer.common.engine import fit

        def hook(call):
            if call == 2:
                pathlib.Path({str(marker)!r}).write_text("training")
            time.sleep(0.3)

        run = lambda args: fit(make_task(hook), engine(pathlib.Path({str(out)!r})))
        sys.exit(run_main(argparse.ArgumentParser(prog="tiny"), run, []))
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "tiny: stopped by SIGTERM at step" in err and "--resume" in err
    assert len(list((out / "checkpoints").glob("step-*/model.safetensors"))) == 1
    assert not json.loads((out / "results.json").read_text())["complete"]


@pytest.mark.slow
def test_two_processes_on_cpu_resume_equals_uninterrupted(tmp_path):
    """A torchrun-style launch without GPUs: DDP over gloo; a --max-time stop resumed gives the same weights."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from test_transfer_engine import engine, make_task
        from transfer.common.engine import fit

        out, max_time = sys.argv[1], float(sys.argv[2]) or None
        fit(make_task(lambda call: time.sleep(0.2)), engine(out, max_time=max_time,
                                                            resume="latest" if max_time is None else None))
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}

    def launch(out: str, max_time: float) -> dict:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / out), str(max_time)], env=env, check=True, timeout=600,
                       capture_output=True)
        return json.loads((tmp_path / out / "results.json").read_text())

    full = launch("full", 0)
    assert full["num_processes"] == 2 and full["complete"]
    stopped = launch("split", 0.5)
    assert not stopped["complete"] and 0 < stopped["steps"] < STEPS
    assert launch("split", 0)["weights"] == full["weights"]


def _reference_loop(model, optimizer, scheduler, loader, loss_fn, total, clip=None) -> float:
    """The loop each task had before the engine (classification, torchvision det and seg at 54222cc~1)."""
    step, losses = 0, []
    model.train()
    while step < total:
        for batch in loader:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
    return sum(losses[-10:]) / len(losses[-10:])


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from ce_pretrain import ContextEncoder
    from transfer.common.synthetic_voc import make_synthetic_voc

    root = tmp_path_factory.mktemp("voc")
    torch.manual_seed(0)
    ContextEncoder("resnet18", image_size=64).save_pretrained(root / "ce")
    return str(root / "ce"), str(make_synthetic_voc(root / "data", num_images=8, size=64))


@pytest.mark.slow
def test_ported_tasks_give_the_numbers_of_their_old_loops(voc, tmp_path):
    from transfer.classification import train as cls
    from transfer.common import VOCClassification, VOCDetection, VOCSegmentation, load_encoder
    from transfer.torchvision_det import train as det
    from transfer.torchvision_det.model import build_faster_rcnn
    from transfer.torchvision_seg import train as seg
    from transfer.torchvision_seg.model import build_fcn

    model_dir, data = voc
    voc_dir = pathlib.Path(data) / "VOC2007"
    ids = (voc_dir / "ImageSets/Main/trainval.txt").read_text().split()
    test_ids = (voc_dir / "ImageSets/Main/test.txt").read_text().split()

    # classification, fine-tuned
    c = cls.ClassificationConfig(model=model_dir, data_root=data, max_steps=6, batch_size=3, test_crops=2,
                                 num_workers=0, lr=1e-3, output_dir=str(tmp_path / "cls"))
    torch.manual_seed(0)
    ckpt = load_encoder(model_dir)
    train_tf, test_tf = cls._transforms(ckpt, ckpt.image_size)
    train_set = VOCClassification(data, 2007, ids=ids, transform=train_tf)
    model = cls.build_model(ckpt, c)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=3, shuffle=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, c.lr, total_steps=6, pct_start=0.1)
    loss = _reference_loop(model, optimizer, scheduler, loader, lambda m, b: cls.masked_bce(m(b[0]), b[1]), 6)
    expected = cls.evaluate(model, VOCClassification(data, 2007, ids=test_ids, transform=test_tf), 2, 3, 0, 0)
    got = cls.run(c)
    assert (got["mAP"], got["final_loss"]) == (expected["mAP"], pytest.approx(loss, rel=1e-12))

    # torchvision Faster R-CNN
    d = det.DetectionConfig(model=model_dir, data_root=data, max_steps=4, min_size=64, max_size=96, num_workers=0,
                            lr=0.005, output_dir=str(tmp_path / "det"))
    torch.manual_seed(0)
    ckpt = load_encoder(model_dir)
    train_set = VOCDetection(data, 2007, ids=ids, transform=det._flip)
    train_set.ids = [i for i in train_set.ids if len(train_set.annotation(i).labels)]
    model = build_faster_rcnn(ckpt, 21, None, 64, 96, rpn_post_nms_top_n_test=d.test_proposals)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=d.lr, momentum=0.9, weight_decay=d.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=2, shuffle=True, collate_fn=det._collate)
    total = 4

    def warm_cosine(s):  # warm-up of max(1, total // 10) = 1 step, then cosine
        return min(1.0, (s + 1) / 1) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm_cosine)
    loss = _reference_loop(model, optimizer, scheduler, loader, lambda m, b: sum(m(list(b[0]), [
        {"boxes": t["boxes"], "labels": t["labels"]} for t in b[1]]).values()), total, clip=10.0)
    expected = det.evaluate(model, VOCDetection(data, 2007, ids=test_ids, keep_difficult=True))
    got = det.run(d)
    assert (got["mAP"], got["final_loss"]) == (expected["mAP"], pytest.approx(loss, rel=1e-12))

    # torchvision FCN
    s = seg.SegmentationConfig(model=model_dir, data_root=data, year=2007, train_split="train", test_split="val",
                               max_steps=4, batch_size=2, num_workers=0, output_dir=str(tmp_path / "seg"))
    seg_dir = voc_dir / "ImageSets/Segmentation"
    torch.manual_seed(0)
    ckpt = load_encoder(model_dir)
    train_set = VOCSegmentation(data, 2007, ids=(seg_dir / "train.txt").read_text().split(),
                                transform=seg._PairTransform(ckpt.image_size))
    model = build_fcn(ckpt, 21)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=2, shuffle=True, drop_last=True)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=4, power=0.9)
    loss = _reference_loop(model, optimizer, scheduler, loader,
                           lambda m, b: F.cross_entropy(m(b[0]), b[1], ignore_index=255), 4)
    expected = seg.evaluate(model, VOCSegmentation(data, 2007, ids=(seg_dir / "val.txt").read_text().split(),
                                                   transform=seg._PairTransform(None)))
    got = seg.run(s)
    assert (got["mIoU"], got["final_loss"]) == (expected["mIoU"], pytest.approx(loss, rel=1e-12))


def test_a_checkpoint_predating_a_setting_resumes_with_that_settings_default():
    """Flags added later (e.g. --knn-features, 2026-12-05) must not make every older checkpoint 'of another run'."""
    import dataclasses

    from transfer.common.cli import UsageError
    from transfer.common.engine import _check_same_run, _json_config

    @dataclasses.dataclass
    class Flags:
        lr: float = 0.1
        added_later: str = "old-behaviour"

    config, defaults = _json_config(Flags())
    _check_same_run({"lr": 0.1}, config, "checkpoint 'c'", defaults)  # written before added_later existed
    config, defaults = _json_config(Flags(added_later="new"))
    with pytest.raises(UsageError, match="--added-later was 'old-behaviour', now 'new'"):
        _check_same_run({"lr": 0.1}, config, "checkpoint 'c'", defaults)
    with pytest.raises(UsageError, match="--lr was 0.2, now 0.1"):  # a plain dict config: no defaults
        config, defaults = _json_config({"lr": 0.1})
        _check_same_run({"lr": 0.2}, config, "checkpoint 'c'", defaults)
