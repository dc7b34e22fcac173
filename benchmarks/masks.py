"""Mask generation speed: masks/s for each kind at the paper's sizes (default batch 128 at 227 px, CPU).

    python benchmarks/masks.py [--batch 128] [--size 227] [--device cpu] [--shapes VOC2012/SegmentationObject]

A training step of AlexNet at batch 128 takes seconds on a CPU and tens of milliseconds on a GPU; masks must cost
a small fraction of that. Prints the median time per batch and masks per second of every kind and region source.
"""

from __future__ import annotations

import argparse
import time

import torch

from ce_pretrain.masks import ShapeBank, make_masks, mask_coverage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=227)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shapes", help="folder of segmentation masks for the ShapeBank source")
    args = p.parse_args()

    cases = [("center", "procedural"), ("random-block", "procedural"), ("random-region", "procedural"),
             ("random-region", "noise")]
    if args.shapes:
        cases.append(("random-region", ShapeBank.from_folder(args.shapes)))
    print(f"batch {args.batch} at {args.size}×{args.size} px on {args.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'kind':14s} {'source':12s} {'ms/batch':>9s} {'masks/s':>9s} {'coverage min–max':>18s}")
    gen = torch.Generator().manual_seed(0)
    for kind, source in cases:
        def once():
            return make_masks(kind, args.batch, args.size, args.size, generator=gen, device=args.device,
                              source=source)

        once()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            mask = once()
            if mask.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        cov = mask_coverage(mask)
        name = source if isinstance(source, str) else f"bank({len(source)})"
        print(f"{kind:14s} {name:12s} {med * 1e3:9.1f} {args.batch / med:9.0f} "
              f"{cov.min().item():8.3f}–{cov.max().item():.3f}")


if __name__ == "__main__":
    main()
