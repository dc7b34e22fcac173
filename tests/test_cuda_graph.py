"""--cuda-graph: the whole training step captured once and replayed.

On the CPU: what the capture relies on and can be checked without a GPU — capturable optimisers with their rates in
tensors give the same weights as the plain ones and follow the schedule; refused combinations fail in one line.
On a CUDA GPU: replays match eager steps, the schedule and non-finite skips reach the graph, and a real run resumes.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from ce_pretrain.config import ConfigError, TrainConfig, validate
from ce_pretrain.cuda_graph import GraphedStep, check_supported, make_capturable, plain_rates
from ce_pretrain.train import main
from tests.test_objective import BATCH, SIZE, changed, snapshot, step, tiny_objective

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _weights(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot(obj).items() if "running_" not in k and "num_batches" not in k}


def test_capturable_optimisers_with_tensor_rates_train_exactly_like_the_plain_ones():
    plain, capt = tiny_objective(adversarial=True), tiny_objective(adversarial=True)
    for opt in capt.optimizers:
        make_capturable(opt, "cpu")
    assert all(isinstance(g["lr"], torch.Tensor) and g["capturable"] for o in capt.optimizers
               for g in o.param_groups)
    for factor in (0.1, 1.0, 0.5):  # a schedule: the in-place rate must reach the optimiser
        for obj in (plain, capt):
            obj.scale_lr(factor)
            step(obj)
    assert capt.opt_g.param_groups[0]["lr"].item() == pytest.approx(0.5e-3)
    assert capt.lr == plain.lr == pytest.approx(0.5e-3)  # a float for the logs either way
    a, b = _weights(plain), _weights(capt)
    assert not [k for k in a if not torch.allclose(a[k], b[k].to(a[k].dtype), rtol=1e-6, atol=1e-7)]


def test_capturable_optimisers_still_skip_a_non_finite_step():
    obj = tiny_objective(adversarial=True)
    for opt in obj.optimizers:
        make_capturable(opt, "cpu")
    step(obj)
    before = snapshot(obj)
    step(obj, poison=True)
    assert not changed(before, snapshot(obj))
    assert obj.monitor.read() == (1, 1, 1)


def test_the_rate_tensor_survives_a_schedule_written_in_place():
    obj = tiny_objective(adversarial=False)
    make_capturable(obj.opt_g, "cpu")
    lr = obj.opt_g.param_groups[0]["lr"]
    obj.scale_lr(0.25)
    assert obj.opt_g.param_groups[0]["lr"] is lr  # the tensor a captured graph reads, not a new one
    assert lr.item() == pytest.approx(2.5e-4)


def test_a_graph_runs_checkpoint_resumes_eagerly_with_float_rates(tmp_path):
    """Optimiser state saved with tensor rates (a --cuda-graph run) loads into an eager run as floats, and that run
    trains exactly like one that never saw tensors."""
    graph_run = tiny_objective(adversarial=True)
    for opt in graph_run.optimizers:
        make_capturable(opt, "cpu")
    step(graph_run)
    graph_run.accelerator.save_state(str(tmp_path / "ckpt"))
    eager, reference = tiny_objective(adversarial=True), tiny_objective(adversarial=True)
    step(reference)
    eager.accelerator.load_state(str(tmp_path / "ckpt"))
    assert isinstance(eager.opt_g.param_groups[0]["lr"], torch.Tensor)  # as loaded
    for opt in eager.optimizers:
        plain_rates(opt)
    assert [type(g["lr"]) for o in eager.optimizers for g in o.param_groups] == [float, float]
    for obj in (eager, reference):
        obj.scale_lr(0.5)
        step(obj)
    a, b = _weights(reference), _weights(eager)
    assert not [k for k in a if not torch.allclose(a[k], b[k].to(a[k].dtype), rtol=1e-6, atol=1e-7)]


@pytest.mark.parametrize("change, message", [
    (dict(compile="default"), "--compile"),
    (dict(gradient_accumulation_steps=2), "--gradient-accumulation-steps"),
    (dict(mixed_precision="fp16"), "fp16"),
    (dict(cpu=True), "--cpu"),
])
def test_refused_combinations(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(cuda_graph=True, **change))


def test_a_cpu_accelerator_cannot_capture():
    reason = check_supported(Accelerator(cpu=True))
    assert reason is not None and "CUDA GPU" in reason and "cpu" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_train_refuses_cuda_graph_without_a_gpu_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--cuda-graph", "--output-dir", str(out)]) == 2
    assert "--cuda-graph needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- on a CUDA GPU
def _cuda_objective(adversarial: bool = True):
    obj = tiny_objective(adversarial=adversarial)
    obj.core.cuda()
    if obj.disc_core is not None:
        obj.disc_core.cuda()
    for opt in obj.optimizers:  # the state is created lazily at the first step, on the parameters' device
        assert not opt.state
    obj.monitor = type(obj.monitor)("cuda")
    return obj


def _batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(BATCH, 3, SIZE, SIZE, generator=g).cuda() for _ in range(n)]


@needs_cuda
def test_replays_match_eager_steps():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, graphed = _cuda_objective(), _cuda_objective()
    run = GraphedStep(graphed, warmup_steps=2)
    for i, images in enumerate(_batches(6)):
        mask = eager.masks(BATCH, i, "cuda")
        eager.scale_lr(1.0 / (i + 1))
        graphed.scale_lr(1.0 / (i + 1))
        want, _ = eager.step(images, mask)
        got, _ = run(images, mask)
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-6), (i, want.item(), got.item())
    assert run.captured
    a, b = _weights(eager), _weights(graphed)
    assert not [k for k in a if not torch.allclose(a[k], b[k].to(a[k].dtype), rtol=1e-3, atol=1e-5)]


@needs_cuda
def test_a_replayed_non_finite_step_is_skipped():
    obj = _cuda_objective()
    run = GraphedStep(obj, warmup_steps=1)
    images = _batches(1)[0]
    mask = obj.masks(BATCH, 0, "cuda")
    run(images, mask)
    run(images, mask)  # captured
    before = snapshot(obj)
    poisoned = images.clone()
    poisoned[0, 0, SIZE // 2, SIZE // 2] = float("nan")
    run(poisoned, mask)
    assert not changed(before, snapshot(obj))
    assert obj.monitor.read()[2] == 1


@needs_cuda
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_real_run_with_cuda_graph_resumes(tmp_path, precision):
    out = tmp_path / "run"
    flags = ["--backbone", "alexnet", "--image-size", "99", "--batch-size", "8", "--checkpoint-every", "4",
             "--log-every", "2", "--num-workers", "0", "--output-dir", str(out), "--cuda-graph",
             "--lr-schedule", "cosine", "--warmup-steps", "2", "--mixed-precision", precision]
    assert main([*flags, "--max-steps", "6"]) == 0
    assert main([*flags, "--max-steps", "10", "--resume"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 10 and summary["resumed_from_step"] == 6
