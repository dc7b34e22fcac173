"""Table 2 of the paper in miniature, in one command.

Pretrains the encoder with the context-encoder objective (random-region masks) and with the paper's autoencoder
baseline (the same network reconstructing its whole, unmasked input: ``--mask none``) at the same budget, takes a
random initialisation as the third row, transfers each to VOC classification (fine-tuning, 10-crop test, mAP),
detection (torchvision Faster R-CNN, mAP@0.5) and segmentation (torchvision FCN, mIoU), and prints one table.

    python benchmarks/table2.py --pretrain-data ../shared/data/imagenette-train \\
        --data-root ../shared/data/voc2012-subset --output-dir runs/table2

With the ``voc2012-subset`` of ``../shared/data``: classification and detection train on ``Main/trainval`` minus a
held-out 20 % they are tested on; segmentation trains on the SBD-only ``aug`` ids (``SegmentationClassAug``)
and is tested on the official ``train`` masks (disjoint images, with void borders). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transfer.classification.train import ClassificationConfig  # noqa: E402
from transfer.classification.train import run as run_classification  # noqa: E402
from transfer.torchvision_det.train import DetectionConfig  # noqa: E402
from transfer.torchvision_det.train import run as run_detection  # noqa: E402
from transfer.torchvision_seg.train import SegmentationConfig  # noqa: E402
from transfer.torchvision_seg.train import run as run_segmentation  # noqa: E402

# Table 2 of the paper (AlexNet, full budget): classification mAP, Fast R-CNN mAP, FCN mIoU
PAPER = {"random": (53.3, 43.4, 19.8), "autoencoder": (53.8, 41.9, 25.2), "context-encoder": (56.5, 44.5, 29.7)}
METHODS = {"context-encoder": "random-region", "autoencoder": "none", "random": None}


def pretrain(method: str, args: argparse.Namespace, out: Path) -> str:
    """Run ``ce_pretrain/train.py`` for ``method`` (unless its output exists); returns the model source."""
    if METHODS[method] is None:
        return f"random:{args.backbone}"
    target = out / f"pretrain-{method}"
    if not (target / "model.safetensors").is_file():
        cmd = [sys.executable, str(REPO / "ce_pretrain" / "train.py"), "--backbone", args.backbone,
               "--data", args.pretrain_data, "--image-size", str(args.image_size), "--batch-size",
               str(args.pretrain_batch_size), "--max-steps", str(args.pretrain_steps), "--mask", METHODS[method],
               "--output-dir", str(target), "--seed", str(args.seed), "--cpu", "--num-workers", str(args.workers)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(target)


def transfer(source: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Classification mAP, detection mAP@0.5 and segmentation mIoU of one pretrained encoder (runs under ``out``)."""
    common = dict(model=source, data_root=args.data_root, year=args.year, num_workers=args.workers, seed=args.seed,
                  overwrite=True)
    cls = run_classification(ClassificationConfig(**common, holdout=0.2, image_size=args.image_size,
                                                  max_steps=args.cls_steps, batch_size=32,
                                                  output_dir=str(out / "classification")))
    det = run_detection(DetectionConfig(**common, holdout=0.2, min_size=args.det_size,
                                        max_size=int(args.det_size * 5 / 3), max_steps=args.det_steps, batch_size=2,
                                        test_proposals=300, output_dir=str(out / "detection")))
    seg = run_segmentation(SegmentationConfig(**common, train_split=args.seg_train_split,
                                              test_split=args.seg_test_split, crop_size=args.image_size,
                                              max_steps=args.seg_steps, batch_size=8,
                                              output_dir=str(out / "segmentation")))
    return {"classification": cls["mAP"], "detection": det["mAP"], "segmentation": seg["mIoU"]}


def format_table(results: dict[str, dict[str, float]], header: str) -> str:
    lines = [header, "",
             "| pretraining | classification mAP | detection mAP@0.5 | segmentation mIoU | paper (cls / det / seg) |",
             "|---|---|---|---|---|"]
    for method, r in results.items():
        paper = " / ".join(f"{v:.1f}" for v in PAPER[method])
        lines.append(f"| {method} | {r['classification']:.1f} | {r['detection']:.1f} | {r['segmentation']:.1f} "
                     f"| {paper} |")
    return "\n".join(lines)


def collect(dirs: list[str]) -> str:
    """One table from the ``results.json`` of several runs (e.g. one per method, run in parallel)."""
    results, run_args = {}, None
    for d in dirs:
        data = json.loads((Path(d) / "results.json").read_text())
        results.update(data["results"])
        run_args = run_args or data["args"]
    order = {m: i for i, m in enumerate(METHODS)}
    results = dict(sorted(results.items(), key=lambda kv: order[kv[0]]))
    a = run_args
    header = (f"Mini Table 2: {a['backbone']} at {a['image_size']} px; pretraining {a['pretrain_steps']} steps × "
              f"{a['pretrain_batch_size']} images; transfer {a['cls_steps']} / {a['det_steps']} / {a['seg_steps']} "
              "steps (cls / det / seg)")
    return format_table(results, header)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-data", default=str(REPO.parent / "shared" / "data" / "imagenette-train"))
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "voc2012-subset"))
    p.add_argument("--year", type=int, default=2012)
    p.add_argument("--seg-train-split", default="aug")
    p.add_argument("--seg-test-split", default="train")
    p.add_argument("--backbone", default="alexnet")
    p.add_argument("--image-size", type=int, default=131)
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--cls-steps", type=int, default=80)
    p.add_argument("--det-steps", type=int, default=100)
    p.add_argument("--det-size", type=int, default=192, help="shorter side of detection inputs")
    p.add_argument("--seg-steps", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/table2")
    p.add_argument("--collect", nargs="+", metavar="DIR",
                   help="only print the table of the results.json files in these output dirs (parallel runs)")
    args = p.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return
    for path, what in ((args.data_root, "--data-root"), (args.pretrain_data, "--pretrain-data")):
        if not Path(path).is_dir():
            sys.exit(f"error: {what} {path!r} does not exist")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, start = {}, time.time()
    for method in args.methods:
        source = pretrain(method, args, out)
        results[method] = transfer(source, args, out / "transfer" / method)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    minutes = (time.time() - start) / 60
    header = (f"Mini Table 2: {args.backbone} at {args.image_size} px; pretraining {args.pretrain_steps} steps × "
              f"{args.pretrain_batch_size} images; transfer {args.cls_steps} / {args.det_steps} / {args.seg_steps} "
              f"steps (cls / det / seg); {minutes:.0f} min on {platform.machine()} CPU ×{_cpus()}")
    table = format_table(results, header)
    (out / "table2.md").write_text(table + "\n")
    print(table)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
