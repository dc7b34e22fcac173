"""Training throughput, peak memory and model FLOPs utilisation of ce-pretrain's training step.

    python benchmarks/train_throughput.py                                  # presets + a few backbones, fp32 & bf16
    python benchmarks/train_throughput.py --configs inpainting:dcgan_encoder --precision fp32 bf16 \\
        --port-dir /path/to/context_encoder_pytorch                       # also time BoyuanJiang's port

For each configuration (``preset:backbone``) and precision, in a fresh process so peak memory is its own:

* ``compute``: ms/step and images/s of the real training step (``objective.ContextEncoderObjective``: forward, losses, backward,
  optimiser(s)) on in-memory tensors with precomputed masks — data excluded;
* ``data`` / ``masks``: ms per batch of the loader's work alone, in the main process (decode, resize, crop, flip,
  collate: what each of the ``--workers`` loader processes spends per batch) and of mask generation alone;
* ``end-to-end``: the step fed by the loader and fresh masks, as ``train.py`` runs it — data included;
* ``MFU``: model FLOPs per step (counted with ``torch.utils.flop_counter``) over the step time, against this
  machine's *measured* dense matmul rate in the same precision (the practical ceiling, not a datasheet number);
* ``peak MB``: the process's peak resident memory (CPU) or peak allocated memory (CUDA).

``--port-dir`` points at a local clone of BoyuanJiang/context_encoder_pytorch (not shipped here); its ``_netG`` /
``_netlocalD`` are imported from there and trained the way its ``train.py`` does (fp32, NCHW, three discriminator
forwards per step, batch 64, 128 px) on the same in-memory tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

DEFAULT_CONFIGS = ["features:alexnet", "inpainting:dcgan_encoder", "features:resnet18", "features:resnet50"]


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeat: int = 8) -> float:
    """Measured dense matmul FLOP/s for ``dtype`` on this device (best of three runs)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync()
        t = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * repeat / best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_ours(args: SimpleNamespace) -> dict:
    from accelerate import Accelerator

    from ce_pretrain.config import PRESETS, TrainConfig
    from ce_pretrain.data import EpochSampler, ImageDataset, collate, list_images, sample_images
    from ce_pretrain.objective import ContextEncoderObjective

    preset, backbone = args.config.split(":")
    values = {k: v for k, v in PRESETS[preset].items() if k in TrainConfig.__dataclass_fields__}
    values.update(preset=preset, backbone=backbone, mixed_precision="bf16" if args.precision == "bf16" else "no",
                  channels_last=not args.nchw)
    if args.batch_size:
        values["batch_size"] = args.batch_size
    if backbone not in ("alexnet", "alexnet_poolfree", "dcgan_encoder") and preset == "features":
        values["image_size"] = 224
    cfg = TrainConfig(**values)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    runner = ContextEncoderObjective.build(cfg, accelerator)
    rule = runner.mask_rule
    device, b, s = accelerator.device, cfg.batch_size, cfg.image_size
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.rand(b, 3, s, s, device=device).contiguous(memory_format=memory)
    gen = torch.Generator().manual_seed(0)
    mask = rule.sample(b, gen, device=device)

    flops = _count_flops(lambda: runner.step(images, mask))
    compute = _time(lambda: runner.step(images, mask), args.steps, args.warmup)
    masks = _time(lambda: rule.sample(b, gen, device=device), args.steps, 1)

    files = list_images(args.data) if args.data else sample_images()
    dataset = ImageDataset(files, s, cache=len(files) <= 256)
    direct = iter(torch.utils.data.DataLoader(dataset, batch_size=b, sampler=EpochSampler(len(files), seed=1),
                                              collate_fn=collate))
    data = _time(lambda: next(direct), args.steps, 2)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=b, sampler=EpochSampler(len(files)), collate_fn=collate, num_workers=args.workers,
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    batches = iter(loader)

    def fed_step():
        crops, _ = next(batches)
        x = crops.to(device).float().div_(255).contiguous(memory_format=memory)
        runner.step(x, rule.sample(b, gen, device=device))

    end_to_end = _time(fed_step, args.steps, 1)
    return dict(config=args.config, precision=args.precision, batch=b, size=s, flops=flops, compute_s=compute,
                data_s=data, masks_s=masks, e2e_s=end_to_end, peak_mb=_peak_mb())


def bench_port(args: SimpleNamespace) -> dict:
    """BoyuanJiang/context_encoder_pytorch's step, as its train.py runs it (imported from ``--port-dir``)."""
    spec = importlib.util.spec_from_file_location("port_model", Path(args.port_dir) / "model.py")
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    opt = SimpleNamespace(ngpu=1, nc=3, nef=64, ngf=64, ndf=64, nBottleneck=4000)
    net_g, net_d = port._netG(opt), port._netlocalD(opt)
    bce, b, s, overlap, wtl2 = torch.nn.BCELoss(), args.batch_size or 64, 128, 4, 0.999
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(b, 3, s, s) * 2 - 1
    center = real[:, :, s // 4: s // 4 + s // 2, s // 4: s // 4 + s // 2].clone()
    cropped = real.clone()
    cropped[:, :, s // 4 + overlap: s // 4 + s // 2 - overlap, s // 4 + overlap: s // 4 + s // 2 - overlap] = 0
    weights = torch.full_like(center, wtl2 * 10)
    weights[:, :, overlap: s // 2 - overlap, overlap: s // 2 - overlap] = wtl2

    def step():
        net_d.zero_grad()
        err_real = bce(net_d(center), torch.ones(b, 1))
        err_real.backward()
        fake = net_g(cropped)
        err_fake = bce(net_d(fake.detach()), torch.zeros(b, 1))
        err_fake.backward()
        opt_d.step()
        net_g.zero_grad()
        err_adv = bce(net_d(fake), torch.ones(b, 1))
        err_l2 = ((fake - center).pow(2) * weights).mean()
        ((1 - wtl2) * err_adv + wtl2 * err_l2).backward()
        opt_g.step()

    flops = _count_flops(step)
    compute = _time(step, args.steps, args.warmup)
    return dict(config="port:BoyuanJiang", precision="fp32", batch=b, size=s, flops=flops, compute_s=compute,
                data_s=None, masks_s=None, e2e_s=None, peak_mb=_peak_mb())


def run_single(spec: dict) -> None:
    args = SimpleNamespace(**spec)
    result = bench_port(args) if args.config.startswith("port") else bench_ours(args)
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="preset:backbone pairs")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch-size", type=int, help="default: the preset's (64)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--data", help="image folder for the data-included timing (default: the demo photographs)")
    p.add_argument("--port-dir", help="local clone of BoyuanJiang/context_encoder_pytorch to compare with")
    p.add_argument("--nchw", action="store_true", help="disable channels-last")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        run_single(json.loads(args.single))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"device: {device}; torch {torch.__version__}; measured matmul: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s")
    jobs = [dict(config=c, precision=pr) for c in args.configs for pr in args.precision]
    if args.port_dir:
        jobs.append(dict(config="port", precision="fp32"))
    header = (f"{'config':28s} {'prec':5s} {'batch':>5s} {'px':>4s} {'ms/step':>8s} {'img/s':>7s} {'GFLOP/st':>9s} "
              f"{'MFU':>6s} {'data ms':>8s} {'mask ms':>8s} {'e2e ms':>8s} {'e2e img/s':>9s} {'peak MB':>8s}")
    print(header)
    print("-" * len(header))
    results = []
    for job in jobs:
        spec = dict(job, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, workers=args.workers,
                    data=args.data, port_dir=args.port_dir, nchw=args.nchw)
        proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{job['config']:28s} {job['precision']:5s} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(line[7:])
        results.append(r)
        mfu = r["flops"] / r["compute_s"] / rates[r["precision"]]

        def ms(v):
            return f"{v * 1e3:8.0f}" if v is not None else f"{'-':>8s}"

        e2e_ips = f"{r['batch'] / r['e2e_s']:9.1f}" if r["e2e_s"] else f"{'-':>9s}"
        print(f"{r['config']:28s} {r['precision']:5s} {r['batch']:5d} {r['size']:4d} {ms(r['compute_s'])} "
              f"{r['batch'] / r['compute_s']:7.1f} {r['flops'] / 1e9:9.1f} {mfu:6.1%} {ms(r['data_s'])} "
              f"{ms(r['masks_s'])} {ms(r['e2e_s'])} {e2e_ips} {r['peak_mb']:8.0f}")
    port = next((r for r in results if r["config"].startswith("port")), None)
    if port:
        for r in results:
            if r["config"] == "inpainting:dcgan_encoder":
                print(f"inpainting preset {r['precision']}: {port['compute_s'] / r['compute_s']:.2f}× the port's "
                      f"speed per step ({r['compute_s'] * 1e3:.0f} vs {port['compute_s'] * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
