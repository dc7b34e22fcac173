"""Convert the standard selective-search proposal files of Fast R-CNN to detectron2's proposal pickle.

The files distributed with Fast R-CNN (``selective_search_data/voc_2007_{trainval,test}.mat``) hold ``images``
(image ids) and ``boxes`` (one ``[N, 4]`` array per image, ``y1 x1 y2 x2``, 1-based inclusive). detectron2's
``DATASETS.PROPOSAL_FILES_*`` read a pickle with ``ids``, ``boxes`` (``XYXY_ABS``, continuous) and
``objectness_logits``; selective search has no scores, so its rank order is kept as decreasing logits.

    python -m transfer.detectron2.proposals voc_2007_trainval.mat voc_2007_trainval.pkl
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from ce_pretrain.atomic import write_atomic
from transfer.common.cli import OneLineParser, run_main

__all__ = ["convert_selective_search"]


def _strings(cell) -> list[str]:
    return [str(np.asarray(x).squeeze()) for x in np.asarray(cell).ravel()]


def convert_selective_search(mat_file: str | Path, output: str | Path, top_k: int | None = None) -> int:
    """Write the detectron2 proposal pickle; returns the number of images.

    Args:
        mat_file: a Fast R-CNN selective-search ``.mat`` file (MATLAB v5).
        output: the ``.pkl`` to write.
        top_k: keep at most this many proposals per image (in their original order).
    """
    from scipy.io import loadmat

    if not Path(mat_file).is_file():
        raise FileNotFoundError(f"proposal file {str(mat_file)!r} does not exist")
    out_dir = Path(output).parent
    if not out_dir.is_dir():  # checked before the (slow) read, and not to be confused with a missing input
        raise FileNotFoundError(f"output folder {str(out_dir)!r} of {str(output)!r} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output folder {str(out_dir)!r} of {str(output)!r} is not writable")
    data = loadmat(str(mat_file))
    if "boxes" not in data or "images" not in data:
        raise ValueError(f"{str(mat_file)!r} is not a selective-search file (needs 'boxes' and 'images')")
    ids = _strings(data["images"])
    raw = np.asarray(data["boxes"]).ravel()
    if len(raw) != len(ids):
        raise ValueError(f"{str(mat_file)!r}: {len(ids)} images but {len(raw)} box arrays")
    boxes, logits = [], []
    for b in raw:
        b = np.asarray(b, np.float32).reshape(-1, 4)[:top_k]
        # y1 x1 y2 x2 (1-based inclusive) → x0 y0 x1 y1 (continuous, as detectron2 reads VOC boxes)
        boxes.append(np.stack([b[:, 1] - 1, b[:, 0] - 1, b[:, 3], b[:, 2]], axis=1))
        logits.append(-np.arange(len(b), dtype=np.float32))
    data = {"ids": ids, "boxes": boxes, "objectness_logits": logits, "bbox_mode": 0}
    write_atomic(output, lambda tmp: tmp.write_bytes(pickle.dumps(data)))
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    """Bad input: one line on stderr, exit status 2."""
    p = OneLineParser(prog="python -m transfer.detectron2.proposals", description=__doc__.split("\n\n")[0])
    p.add_argument("mat_file")
    p.add_argument("output")
    p.add_argument("--top-k", type=int)

    def run(args: argparse.Namespace) -> None:
        n = convert_selective_search(args.mat_file, args.output, args.top_k)
        print(f"wrote proposals of {n} images to {args.output}")

    return run_main(p, run, argv, errors=(OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
