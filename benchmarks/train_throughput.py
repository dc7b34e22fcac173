"""Training throughput, peak memory and model FLOPs utilisation of ce-pretrain's training step.

    python benchmarks/train_throughput.py --port-dir /path/to/context_encoder_pytorch   # every device found
    python benchmarks/train_throughput.py --devices cpu --configs inpainting:dcgan_encoder:64 --precision fp32

On every device it finds (the CPU, and a CUDA GPU when there is one) it times that device's plan: on a GPU the
issue-11 targets (inpainting at batch 64 and 256, AlexNet features at 256, ResNet-50 at 224 px), on the CPU the
inpainting preset and AlexNet at batch 64 (a few minutes on two cores); ``--port-dir`` times the port on the same
device, and each device's inpainting rows print their ratio to it. Precisions: fp32, plus bf16 where this device
runs a bf16 matmul at least as fast as fp32 (a GPU; on CPUs only those with native bf16 — torch 2.14's CPU bf16 can
be ~50× slower than fp32). For each configuration (``preset:backbone:batch``) and precision, in a fresh process so
peak memory is its own:

* ``compute``: ms/step and images/s of the real training step (``objective.ContextEncoderObjective``: forward,
  losses, backward, optimiser(s)) on in-memory tensors with precomputed masks — data excluded;
* ``data`` / ``masks``: ms per batch of the loader's work alone, in the main process (decode, resize, crop, flip,
  collate: what each of the ``--workers`` loader processes spends per batch) and of mask generation alone;
* ``end-to-end``: the step fed by the loader and fresh masks, as ``train.py`` runs it — data included;
* ``cache e2e``: the same step fed by ``--data-cache`` instead (:class:`~ce_pretrain.gpu_data.CachedCrops`: images
  decoded once into a memory-mapped uint8 file, crops and flips cut on the device) — the GPU data path;
* ``MFU``: model FLOPs per step (counted with ``torch.utils.flop_counter``) over the step time, against this
  machine's *measured* dense matmul rate in the same precision (the practical ceiling, not a datasheet number);
* ``peak MB``: the process's peak resident memory (CPU) or peak allocated memory (CUDA).

On a GPU each configuration also gets a ``+cuda-graph`` row: the whole step captured once as a CUDA graph and
replayed (``train.py --cuda-graph``, :class:`~ce_pretrain.cuda_graph.GraphedStep`), timed after its capture.
``--compile MODE ...`` adds, for each configuration, rows whose model and discriminator run under
``torch.compile(mode=MODE)`` (``default``, ``reduce-overhead`` = CUDA graphs of the model alone, ``max-autotune``...),
timed after the warm-up steps that compile them.

On the CPU, our rows run with freed host memory kept in the process, as ``train.py`` does there
(:mod:`ce_pretrain.host_memory`); the port is timed as its ``train.py`` runs and once more with the same setting, so
the ratio that is ours alone is printed too.

``--port-dir`` points at a local clone of BoyuanJiang/context_encoder_pytorch (not shipped here); its ``_netG`` /
``_netlocalD`` are imported from there and trained the way its ``train.py`` does (fp32, NCHW, three discriminator
forwards per step, batch 64, 128 px) on the same in-memory tensors, on the same device as ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

# preset:backbone:batch per device: the issue-11 targets on a GPU; what two CPU cores finish in a few minutes
PLANS = {
    "cuda": ["inpainting:dcgan_encoder:64", "inpainting:dcgan_encoder:256", "features:alexnet:256",
             "features:resnet50:256"],
    "cpu": ["inpainting:dcgan_encoder:64", "features:alexnet:64"],
}
# images/s of the step (and end to end, from files) that issue 11 asks of one H100 in bf16
GPU_TARGETS = {("inpainting:dcgan_encoder", 256): 40_000, ("features:alexnet", 256): 20_000,
               ("features:resnet50", 256): 5_000}


def matmul_rate(dtype: torch.dtype, device: str, budget_s: float = 2.0) -> float:
    """Measured dense matmul FLOP/s for ``dtype`` on ``device``: best of a few runs, sized to finish in about
    ``budget_s`` even where the precision is pathologically slow (CPU bf16 without native support)."""
    n = 4096 if device == "cuda" else 1024  # 512 on two cores: too short to time, it read 20 % low
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up, and a first estimate of the cost
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 5 and spent < budget_s:
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2 * n**3 / best


def precisions(device: str, rates: dict[str, float]) -> list[str]:
    """fp32, and bf16 where its matmul is at least as fast (always on a GPU; on CPUs only with native bf16)."""
    return ["fp32", "bf16"] if device == "cuda" or rates["bf16"] >= rates["fp32"] else ["fp32"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call after ``warmup`` calls: the median of single calls on a CPU; on a GPU the mean over
    ``steps`` calls queued back to back (synchronising after each call would hide the host running ahead)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return (time.perf_counter() - t) / steps
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_ours(args: SimpleNamespace) -> dict:
    from ce_pretrain.config import PRESETS, TrainConfig
    from ce_pretrain.cuda_graph import GraphedStep
    from ce_pretrain.data import EpochSampler, ImageDataset, collate, list_images
    from ce_pretrain.engine import make_accelerator
    from ce_pretrain.gpu_data import CachedCrops, open_cache
    from ce_pretrain.objective import ContextEncoderObjective
    from ce_pretrain.sources import sample_images

    preset, backbone = args.config.split(":")
    values = {k: v for k, v in PRESETS[preset].items() if k in TrainConfig.__dataclass_fields__}
    graphed = args.compile == "cuda-graph"
    values.update(preset=preset, backbone=backbone, mixed_precision="bf16" if args.precision == "bf16" else "no",
                  channels_last=not args.nchw, batch_size=args.batch_size, cpu=args.device == "cpu",
                  compile=None if graphed else args.compile, cuda_graph=graphed, log_with=[])  # writes no files
    if backbone not in ("alexnet", "alexnet_poolfree", "dcgan_encoder") and preset == "features":
        values["image_size"] = 224
    cfg = TrainConfig(**values)
    # train.py's accelerator: cuDNN autotuning, autocast without its cache under --cuda-graph, freed host memory
    # kept on the CPU; then the model (compiled with --compile) and the step (captured with --cuda-graph)
    accelerator = make_accelerator(cfg)
    runner = ContextEncoderObjective.build(cfg, accelerator)
    step = GraphedStep(runner) if graphed else runner.step
    device, b, s = accelerator.device, cfg.batch_size, cfg.image_size
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.rand(b, 3, s, s, device=device).contiguous(memory_format=memory)
    mask = runner.masks(b, 0, device)

    flops = _count_flops(lambda: runner.step(images, mask))
    # a graphed step is timed after its eager warm-up steps and its capture
    warmup = max(args.warmup, step.warmup_steps + 1) if graphed else args.warmup
    compute = _time(lambda: step(images, mask), args.steps, warmup, args.device)
    seeds = iter(range(1, 10**9))
    masks = _time(lambda: runner.masks(b, next(seeds), device), args.steps, 1, args.device)

    files = list_images(args.data) if args.data else sample_images()
    dataset = ImageDataset(files, s, cache=len(files) <= 256)
    direct = iter(torch.utils.data.DataLoader(dataset, batch_size=b, sampler=EpochSampler(len(files), seed=1),
                                              collate_fn=collate))
    data = _time(lambda: next(direct), min(args.steps, 3), 1, "cpu")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=b, sampler=EpochSampler(len(files)), collate_fn=collate, num_workers=args.workers,
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None,
        pin_memory=args.device == "cuda")
    batches = iter(loader)

    def fed_step():
        crops, _ = next(batches)
        x = crops.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=memory)
        step(x, runner.masks(b, next(seeds), device))

    end_to_end = _time(fed_step, max(2, args.steps // 2), 1, args.device)
    batches = loader = None  # let the loader's workers go before the cached path is timed

    with tempfile.TemporaryDirectory() as tmp:
        cache, _ = open_cache(dataset, Path(tmp) / "cache.npy", num_workers=args.workers)
        cached = iter(CachedCrops(cache, s, b, device, seed=1))

        def cached_step():
            crops, _ = next(cached)
            x = crops.float().div_(255).contiguous(memory_format=memory)
            step(x, runner.masks(b, next(seeds), device))

        cached_e2e = _time(cached_step, max(2, args.steps // 2), 1, args.device)
    return dict(config=args.config, device=args.device, precision=args.precision, batch=b, size=s, flops=flops,
                compute_s=compute, data_s=data, masks_s=masks, e2e_s=end_to_end, cache_s=cached_e2e,
                compile=args.compile, peak_mb=_peak_mb(args.device))


def bench_port(args: SimpleNamespace) -> dict:
    """BoyuanJiang/context_encoder_pytorch's step, as its train.py runs it (imported from ``--port-dir``), on
    ``args.device``."""
    spec = importlib.util.spec_from_file_location("port_model", Path(args.port_dir) / "model.py")
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    dev = torch.device(args.device)
    opt = SimpleNamespace(ngpu=1, nc=3, nef=64, ngf=64, ndf=64, nBottleneck=4000)
    net_g, net_d = port._netG(opt).to(dev), port._netlocalD(opt).to(dev)
    bce, b, s, overlap, wtl2 = torch.nn.BCELoss(), args.batch_size, 128, 4, 0.999
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(b, 3, s, s, device=dev) * 2 - 1
    center = real[:, :, s // 4: s // 4 + s // 2, s // 4: s // 4 + s // 2].clone()
    cropped = real.clone()
    cropped[:, :, s // 4 + overlap: s // 4 + s // 2 - overlap, s // 4 + overlap: s // 4 + s // 2 - overlap] = 0
    weights = torch.full_like(center, wtl2 * 10)
    weights[:, :, overlap: s // 2 - overlap, overlap: s // 2 - overlap] = wtl2
    ones, zeros = torch.ones(b, 1, device=dev), torch.zeros(b, 1, device=dev)

    def step():
        net_d.zero_grad()
        err_real = bce(net_d(center), ones)
        err_real.backward()
        fake = net_g(cropped)
        err_fake = bce(net_d(fake.detach()), zeros)
        err_fake.backward()
        opt_d.step()
        net_g.zero_grad()
        err_adv = bce(net_d(fake), ones)
        err_l2 = ((fake - center).pow(2) * weights).mean()
        ((1 - wtl2) * err_adv + wtl2 * err_l2).backward()
        opt_g.step()

    flops = _count_flops(step)
    compute = _time(step, args.steps, args.warmup, args.device)
    return dict(config="port:BoyuanJiang", device=args.device, precision="fp32", batch=b, size=s, flops=flops,
                compute_s=compute, data_s=None, masks_s=None, e2e_s=None, cache_s=None, compile=None,
                keep_memory=bool(getattr(args, "keep_memory", False)), peak_mb=_peak_mb(args.device))


def run_single(spec: dict) -> None:
    args = SimpleNamespace(**spec)
    torch.manual_seed(0)
    if spec.get("keep_memory"):
        from ce_pretrain.host_memory import retain_freed_memory

        retain_freed_memory()
    result = bench_port(args) if args.config.startswith("port") else bench_ours(args)
    print("RESULT " + json.dumps(result))


def _ms(v: float | None) -> str:
    return f"{v * 1e3:8.1f}" if v is not None else f"{'-':>8s}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                   help="default: every device found (cpu, and cuda when available)")
    p.add_argument("--configs", nargs="+",
                   help="preset:backbone:batch triples; default: each device's plan (see the module docstring)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                   help="default: fp32, plus bf16 where this device's bf16 matmul is at least as fast")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on a GPU, 3 on a CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on a GPU, 1 on a CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--data", help="image folder for the data-included timing (default: the demo photographs)")
    p.add_argument("--port-dir", help="local clone of BoyuanJiang/context_encoder_pytorch to compare with")
    p.add_argument("--port-batch-size", type=int, default=64, help="the port's batch (its train.py's default: 64)")
    p.add_argument("--nchw", action="store_true", help="disable channels-last")
    p.add_argument("--compile", nargs="+", default=[], metavar="MODE",
                   help="also time each configuration under torch.compile(mode=MODE): default, reduce-overhead, ...")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        run_single(json.loads(args.single))
        return
    if args.port_dir and not (Path(args.port_dir) / "model.py").is_file():
        p.error(f"--port-dir {args.port_dir!r} has no model.py (a clone of BoyuanJiang/context_encoder_pytorch)")
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda: no CUDA device is available")
    import accelerate

    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, {time.strftime('%Y-%m-%d')}")
    header = (f"{'config':40s} {'prec':5s} {'batch':>5s} {'px':>4s} {'ms/step':>8s} {'img/s':>8s} {'GFLOP/st':>9s} "
              f"{'MFU':>6s} {'data ms':>8s} {'mask ms':>8s} {'e2e ms':>8s} {'e2e img/s':>9s} {'cache img/s':>11s} "
              f"{'peak MB':>8s}")
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        rates = {"fp32": matmul_rate(torch.float32, device), "bf16": matmul_rate(torch.bfloat16, device)}
        steps = args.steps or (20 if device == "cuda" else 3)
        warmup = args.warmup if args.warmup is not None else (5 if device == "cuda" else 1)
        print(f"\n== {device}: {name}; measured matmul: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s")
        jobs = [dict(config=":".join(c.split(":")[:2]), batch_size=int(c.split(":")[2]) if c.count(":") == 2 else 64,
                     precision=pr, compile=mode)
                for c in (args.configs or PLANS[device]) for pr in (args.precision or precisions(device, rates))
                for mode in (None, *(["cuda-graph"] if device == "cuda" else []), *args.compile)]
        if args.port_dir:
            jobs.append(dict(config="port", batch_size=args.port_batch_size, precision="fp32", compile=None))
            if device == "cpu":  # also with the host-memory setting our CPU runs use, to show what is ours alone
                jobs.append(dict(config="port", batch_size=args.port_batch_size, precision="fp32", compile=None,
                                 keep_memory=True))
        print(header)
        print("-" * len(header))
        results = []
        for job in jobs:
            spec = dict(job, device=device, steps=steps, warmup=warmup, workers=args.workers, data=args.data,
                        port_dir=args.port_dir, nchw=args.nchw)
            proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec)], capture_output=True,
                                  text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{_label(job):40s} {job['precision']:5s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[7:])
            results.append(r)
            mfu = r["flops"] / r["compute_s"] / rates[r["precision"]]
            e2e_ips = f"{r['batch'] / r['e2e_s']:9.1f}" if r["e2e_s"] else f"{'-':>9s}"
            cache_ips = f"{r['batch'] / r['cache_s']:11.1f}" if r["cache_s"] else f"{'-':>11s}"
            print(f"{_label(r):40s} {r['precision']:5s} {r['batch']:5d} {r['size']:4d} {_ms(r['compute_s'])} "
                  f"{r['batch'] / r['compute_s']:8.1f} {r['flops'] / 1e9:9.1f} {mfu:6.1%} {_ms(r['data_s'])} "
                  f"{_ms(r['masks_s'])} {_ms(r['e2e_s'])} {e2e_ips} {cache_ips} {r['peak_mb']:8.0f}")
        report(device, results)


def _label(r: dict) -> str:
    mode = r.get("compile")
    return r["config"] + (" +cuda-graph" if mode == "cuda-graph" else f" +compile:{mode}" if mode else "") + \
        (" +kept host memory" if r.get("keep_memory") else "")


def report(device: str, results: list[dict]) -> None:
    """Each inpainting row's step rate against the port's (per image, so batches may differ), and on a GPU each
    issue-11 target."""
    ports = [r for r in results if r["config"].startswith("port")]
    for r in results:
        ips = r["batch"] / r["compute_s"]
        for port in ports if r["config"] == "inpainting:dcgan_encoder" else ():  # with or without compile
            port_ips = port["batch"] / port["compute_s"]
            print(f"{device}: {_label(r)}, {r['precision']}, batch {r['batch']}: {ips / port_ips:.2f}× the "
                  f"images/s of {_label(port)} at batch {port['batch']} ({ips:.1f} vs {port_ips:.1f})")
        target = GPU_TARGETS.get((r["config"], r["batch"])) if device == "cuda" and r["precision"] == "bf16" else None
        if target:
            e2e = f"; end to end {r['batch'] / r['e2e_s']:.0f} img/s (JPEG loader)" if r["e2e_s"] else ""
            e2e += f", {r['batch'] / r['cache_s']:.0f} img/s (--data-cache)" if r.get("cache_s") else ""
            print(f"{device}: {_label(r)} batch {r['batch']} bf16 step: {ips:.0f} img/s, target {target} "
                  f"({ips / target:.2f}×){e2e}")


if __name__ == "__main__":
    main()
