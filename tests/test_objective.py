"""The training step: no host sync, non-finite steps skipped on the device, fp16 under a real GradScaler."""

import pytest
import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from ce_pretrain import ContextEncoder
from ce_pretrain.discriminator import Discriminator
from ce_pretrain.losses import generator_adversarial_loss
from ce_pretrain.objective import ContextEncoderObjective, NonFiniteMonitor, all_finite

SIZE, BATCH = 32, 4


def tiny_objective(adversarial: bool = True, scaler: torch.amp.GradScaler | None = None, accumulate: int = 1,
                   mask: str = "center"):
    """The inpainting recipe (centre hole, overlap band, joint loss) at toy width: a step takes milliseconds.
    ``mask="random-region"``: the whole image predicted, the loss on the hole only (the features recipe)."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    if scaler is not None:
        # accelerate keeps fp16 off on CPUs; a real GradScaler plugged in takes the CUDA fp16 code path
        acc.scaler = scaler
    pred = SIZE // 2 if mask == "center" else SIZE
    model = ContextEncoder(backbone="dcgan_encoder", image_size=SIZE, pred_size=pred, overlap=2 if pred < SIZE else 0,
                           bottleneck="fc", bottleneck_dim=32, decoder_channels=[16, 8] if pred < SIZE else [16, 8, 8],
                           mask=mask, backbone_kwargs=dict(width=8))
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999), fused=True)
    if not adversarial:
        model, opt_g = acc.prepare(model, opt_g)
        return ContextEncoderObjective(acc, model, None, opt_g, None)
    disc = Discriminator(pred, width=8, max_channels=16)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=True)
    model, disc, opt_g, opt_d = acc.prepare(model, disc, opt_g, opt_d)
    return ContextEncoderObjective(acc, model, disc, opt_g, opt_d, adversarial_weight=0.001)


def snapshot(obj) -> dict[str, torch.Tensor]:
    """Every weight and every optimiser-state tensor (moments and step counts), copied."""
    out = {f"g.{k}": v.detach().clone() for k, v in obj.core.state_dict().items()}
    if obj.disc_core is not None:
        out |= {f"d.{k}": v.detach().clone() for k, v in obj.disc_core.state_dict().items()}
    for name, opt in (("opt_g", obj.opt_g), ("opt_d", obj.opt_d)):
        if opt is not None:
            for i, state in opt.state_dict()["state"].items():
                out |= {f"{name}.{i}.{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


def changed(a: dict, b: dict) -> list[str]:
    """Weights and optimiser state that differ; BatchNorm's running statistics follow every forward pass (a
    skipped step included, as in any framework), so they are left out."""
    return [k for k in a if not torch.equal(a[k], b[k]) and "running_" not in k and "num_batches" not in k]


def step(obj, poison: bool = False):
    """One training step; ``poison`` puts a NaN in a dropped pixel: the model never sees it (the hole is filled
    with the mean), the target holds it, so the loss and the gradients are NaN while BatchNorm stays finite."""
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    if poison:
        images[0, 0, SIZE // 2, SIZE // 2] = float("nan")
    return obj.step(images, obj.masks(BATCH, 0, "cpu"))


@pytest.mark.parametrize("adversarial", [False, True])
def test_step_does_not_wait_for_the_device(adversarial):
    obj = tiny_objective(adversarial)
    step(obj)  # the first step creates Adam's state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(obj)
    assert "aten::_fused_adam_" in {e.key for e in prof.key_averages()}, "the profile did not see the optimiser"
    assert host_reads(prof) == [], "the training step synchronises the host"


def host_reads(prof) -> list[list[str]]:
    """The op chains under which a tensor was read by the host (``.item()``, ``bool(t)``, ``.tolist()``).

    Fused Adam's CPU kernel reads each parameter's step count (a CPU tensor) inside the kernel; its CUDA kernel
    reads them on the device, so those reads are not syncs and are left out.
    """
    found = []
    for e in prof.events():
        if e.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"):
            chain, parent = [e.name], e.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            if "aten::_fused_adam_" not in chain:
                found.append(chain)
    return found


@pytest.mark.parametrize("adversarial", [False, True])
def test_nonfinite_step_leaves_weights_and_adam_state_unchanged(adversarial):
    obj = tiny_objective(adversarial)
    step(obj)
    before = snapshot(obj)
    loss, _ = step(obj, poison=True)
    assert not torch.isfinite(loss)
    assert changed(before, snapshot(obj)) == []
    assert obj.monitor.read() == (1, 1, 1)
    step(obj)  # training goes on from the same state
    after = snapshot(obj)
    assert any(k.startswith("g.") for k in changed(before, after))
    # (the discriminator's BatchNorm statistics saw the NaN target patch: only weights and Adam's state are checked)
    assert all(torch.isfinite(after[k]).all() for k in after if after[k].is_floating_point() and "running_" not in k)
    assert obj.monitor.read() == (0, 0, 0)
    if adversarial:  # the generator's adversarial term leaves no gradient behind in the discriminator
        assert all(p.grad is None for p in obj.disc_core.parameters())


def discriminator_calls(obj) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, logits) of every forward pass of the discriminator, recorded from now on."""
    calls = []
    obj.disc_core.register_forward_hook(lambda _m, args, out: calls.append((args[0].detach(), out.detach())))
    return calls


@pytest.mark.parametrize("mask", ["center", "random-region"])
def test_generator_term_uses_the_discriminators_own_batch(mask):
    """The generator's adversarial term is scored on the batch the discriminator trains on (real | predicted):
    with BatchNorm, a batch of predictions alone is normalised by its own statistics, and a discriminator that
    tells the two apart at once may then call every prediction real (measured on an AlexNet run: P(real) 0.007
    for predictions in its own step, 0.977 on predictions alone)."""
    obj = tiny_objective(mask=mask)
    step(obj)
    calls = discriminator_calls(obj)
    _, logs = step(obj)
    (d_in, _), (g_in, g_out) = calls
    assert d_in.shape[0] == g_in.shape[0] == 2 * BATCH
    assert torch.equal(d_in[:BATCH], g_in[:BATCH])  # the same real images in both
    assert torch.allclose(g_in[BATCH:], d_in[BATCH:])  # and the same predictions (detached in the first)
    torch.testing.assert_close(logs["loss/adversarial"], generator_adversarial_loss(g_out[BATCH:]))


def test_discriminator_sees_only_the_pixels_the_loss_asks_for():
    """Random regions: the prediction covers the whole image, but the loss only its hole, so the rest of it is
    free and would give predictions away; the discriminator sees the hole, the rest set to the dataset mean (0)
    in real and predicted images alike, never the context (§3.2). Centre: the whole predicted patch, unchanged."""
    obj = tiny_objective(mask="random-region")
    calls = discriminator_calls(obj)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mask = obj.masks(BATCH, 0, "cpu")
    obj.step(images, mask)
    seen = calls[0][0]
    hole = torch.cat([mask, mask]).expand_as(seen)
    assert 0 < mask.float().mean() < 1
    assert seen[~hole].abs().max() == 0
    torch.testing.assert_close(seen[:BATCH][hole[:BATCH]], obj.core.normalize(images)[hole[:BATCH]])
    assert seen[BATCH:][hole[BATCH:]].abs().max() > 0  # the predicted hole

    obj = tiny_objective()  # centre: the hole and its overlap band fill the predicted patch
    calls = discriminator_calls(obj)
    step(obj)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(calls[0][0][:BATCH], obj.core.normalize(obj.core.crop(images)))


def test_gradscaler_skips_a_nonfinite_step_without_raising():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    obj = tiny_objective(adversarial=True, scaler=scaler)
    step(obj)
    before = snapshot(obj)
    scale = scaler.get_scale()
    step(obj, poison=True)  # used to raise "No inf checks were recorded prior to update"
    after = snapshot(obj)
    assert changed(before, {k: after[k] for k in before}) == []
    # halved once per optimiser (accelerate updates the scale after each one's step)
    assert scaler.get_scale() == scale / 4, "the scaler did not see the non-finite gradients"
    assert obj.monitor.read() == (1, 1, 1)
    step(obj)
    assert changed(before, {k: snapshot(obj)[k] for k in before})


def test_accumulated_microbatches_skip_the_whole_step():
    obj = tiny_objective(adversarial=False, accumulate=2)
    step(obj)
    step(obj)
    before = snapshot(obj)
    step(obj, poison=True)  # a bad first micro-batch poisons the accumulated gradient
    step(obj)
    assert changed(before, snapshot(obj)) == []
    assert obj.monitor.read() == (1, 1, 1)


def test_monitor_counts_runs_of_skipped_steps():
    monitor = NonFiniteMonitor("cpu", consecutive=2)
    for skipped in (1, 1, 0, 1, 0, 0):
        monitor.record(torch.tensor(float(skipped)))
    assert monitor.read() == (0, 4, 3)
    monitor.record(torch.tensor(1.0))
    assert monitor.read() == (1, 1, 1)


def test_all_finite():
    assert all_finite([torch.ones(3), torch.arange(3)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not all_finite([torch.tensor([float("nan")])])


# the run as a whole: training script flags and outputs

@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--lr", "inf"], ["--beta1", "nan"], ["--discriminator-lr", "inf"],
                                  ["--check-finite-every", "0"]])
def test_nonfinite_hyperparameters_are_refused_up_front(flag, tmp_path, capsys):
    from ce_pretrain.train import main

    assert main([*flag, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag[0] in err[0], err


def test_nonfinite_weights_are_never_saved(tmp_path):
    from ce_pretrain.checkpoint import TrainState
    from ce_pretrain.config import TrainConfig
    from ce_pretrain.engine import ensure_finite_weights

    cfg, state, obj = TrainConfig(output_dir=str(tmp_path)), TrainState(), tiny_objective()
    state.step = 7
    ensure_finite_weights(cfg, obj, state)  # finite: nothing to say
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000005" / "run.json").write_text("{}")
    with torch.no_grad():
        next(obj.core.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite by step 7.*step_00000005"):
        ensure_finite_weights(cfg, obj, state)


@pytest.mark.slow
def test_diverged_run_fails_and_keeps_only_finite_checkpoints(image_folder, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ce_pretrain.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ce_pretrain.train", "--data", str(image_folder), "--output-dir", str(out),
         "--backbone", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
         "--lr", "1e30", "--max-steps", "30", "--checkpoint-every", "1", "--sample-every", "1000",
         "--max-nonfinite-steps", "3",
         "--log-with", "none"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists(), "a diverged run wrote a final model"
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and str(ckpt) in last
    for f in ckpt.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(f).values() if t.is_floating_point()), f


def test_scale_lr_scales_both_optimisers_from_their_base_rates():
    obj = tiny_objective(adversarial=True)
    obj.scale_lr(0.25)
    assert obj.opt_g.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert obj.opt_d.param_groups[0]["lr"] == pytest.approx(2.5e-5)  # the 10:1 ratio is kept
    obj.scale_lr(0.5)  # from the base rates, not from the rates set last
    assert obj.opt_g.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert obj.opt_d.param_groups[0]["lr"] == pytest.approx(5e-5)
    before = snapshot(obj)
    obj.scale_lr(0.0)
    step(obj)
    assert not [k for k in changed(before, snapshot(obj)) if k.startswith("g.")]  # lr 0: the weights stay


@pytest.mark.parametrize("backend", [
    "aot_eager",  # dynamo's graph capture and AOT autograd without code generation: seconds
    pytest.param("inductor", marks=pytest.mark.slow),  # what --compile runs: a minute of C++ codegen on 2 cores
])
def test_compiled_step_matches_eager_and_keeps_weight_names(backend):
    """``--compile``: the same losses and weights as eager (to float tolerance) after real steps, a skipped
    non-finite step still changes nothing, and the model's state_dict keeps its plain names (checkpoints and saved
    models are the same files). ``aot_eager`` checks the same contract of our wrapper through torch.compile's graph
    capture and backward tracing; ``inductor`` (``-m slow``) also runs the generated kernels."""
    from ce_pretrain.objective import _compiled

    eager, compiled = tiny_objective(), tiny_objective()
    keys = list(compiled.core.state_dict())
    for module in (compiled.model, compiled.disc):
        if backend == "inductor":
            _compiled(module, "default")
        else:
            module.compile(backend=backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(2):
        (loss_e, parts_e), (loss_c, parts_c) = step(eager), step(compiled)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
        assert parts_c.keys() == parts_e.keys()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both modules really went through compile
    trained = snapshot(compiled)
    for k, v in snapshot(eager).items():
        torch.testing.assert_close(trained[k], v, rtol=1e-3, atol=1e-5, msg=k)
    step(compiled, poison=True)
    assert changed(trained, snapshot(compiled)) == []
    assert list(compiled.core.state_dict()) == keys


def test_encoder_init_rescale_changes_the_encoder_only_and_fails_in_one_line(tmp_path):
    from ce_pretrain.config import ConfigError, TrainConfig

    cfg = TrainConfig(backbone="alexnet", image_size=99, output_dir=str(tmp_path), encoder_init="rescale")
    images = torch.rand(6, 3, 99, 99, generator=torch.Generator().manual_seed(0))
    objectives = []
    for init in (None, images):
        torch.manual_seed(0)
        objectives.append(ContextEncoderObjective.build(cfg, Accelerator(cpu=True), init_images=init))
    plain, rescaled = (o.core.state_dict() for o in objectives)
    differ = {k.split(".")[0] for k in plain if not torch.equal(plain[k], rescaled[k])}
    assert differ == {"encoder"}
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="^--encoder-init rescale: rescaling .* non-finite"):
        ContextEncoderObjective.build(cfg, Accelerator(cpu=True), init_images=bad)
