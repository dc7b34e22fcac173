"""VOC splits as detectron2 reads them, prepared on our side of the boundary (no detectron2 import).

detectron2's ``register_pascal_voc`` reads ``ImageSets/Main/<split>.txt`` and its ``PascalVOCDetectionEvaluator``
reads every annotation's ``pose``, ``truncated`` and ``difficult`` (``obj.find("pose").text``), which real
annotation sets may lack. :func:`write_split_view` writes, per dataset, a small VOC folder under the output
directory: the split's ids, the annotations with the optional fields filled with the devkit's defaults
(``Unspecified``, ``0``, ``0``), and a link to the original ``JPEGImages``. The source data are never modified,
and ``--holdout`` splits become ordinary split files.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ce_pretrain.atomic import write_text_atomic
from transfer.common.voc import VOC_CLASSES, VOCLayoutError, holdout_split, read_split

__all__ = ["OPTIONAL_FIELDS", "SplitSpec", "plan_splits", "split_of", "write_split_view"]

# the devkit's values for annotations that do not say (VOCdevkit's VOCreadrecxml defaults)
OPTIONAL_FIELDS = {"pose": "Unspecified", "truncated": "0", "difficult": "0"}


@dataclass(frozen=True)
class SplitSpec:
    """One dataset to register: ``name`` (detectron2's), the image ids, and the split whose proposals it uses."""

    name: str
    ids: tuple[str, ...]
    source_split: str


def split_of(dataset_name: str) -> str:
    """The VOC split a config's dataset name asks for: ``voc_2007_trainval`` → ``trainval``."""
    return dataset_name.rsplit("_", 1)[-1]


def plan_splits(voc: Path, year: int, train: list[str], test: list[str], holdout: float = 0.0,
                seed: int = 0) -> tuple[list[SplitSpec], list[SplitSpec]]:
    """The training and test datasets: the named splits, or with ``holdout`` a held-out part of the one train split.

    Args:
        voc: the ``VOC<year>`` folder.
        year: its year (part of the dataset names).
        train: split names for training (``DATASETS.TRAIN``, already reduced by :func:`split_of`).
        test: split names for testing; ignored with ``holdout``.
        holdout: fraction of the training split to test on instead (for folders without a test list).
        seed: which images are held out.

    Raises:
        VOCLayoutError: a split file is missing or empty, or a split is too small for detectron2.
    """
    if holdout:
        if len(train) != 1:
            raise VOCLayoutError(f"--holdout carves the test set out of one training split, not {train}")
        try:
            fit, held = holdout_split(read_split(voc, "Main", train[0]), holdout, seed)
        except ValueError as err:
            raise VOCLayoutError(str(err)) from None
        specs = ([SplitSpec(f"ce_voc_{year}_{train[0]}_fit", tuple(fit), train[0])],
                 [SplitSpec(f"ce_voc_{year}_{train[0]}_holdout", tuple(held), train[0])])
    else:
        specs = tuple([SplitSpec(f"ce_voc_{year}_{s}", tuple(read_split(voc, "Main", s)), s) for s in names]
                      for names in (train, test))
    for spec in (*specs[0], *specs[1]):
        # detectron2 reads split files with np.loadtxt, which turns a single id into a 0-d array it cannot iterate
        if len(spec.ids) < 2:
            raise VOCLayoutError(f"dataset {spec.name} has {len(spec.ids)} image; detectron2 needs at least 2")
    return specs


def _filled_annotation(path: Path) -> str:
    """The XML of ``path`` with every object's optional fields present; one clear line for what cannot be read."""
    if not path.is_file():
        raise VOCLayoutError(f"annotation {str(path)!r} is missing")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise VOCLayoutError(f"annotation {str(path)!r} is not valid XML: {err}") from None
    if root.find("size/width") is None or root.find("size/height") is None:
        raise VOCLayoutError(f"annotation {str(path)!r} has no size/width and size/height")
    for obj in root.findall("object"):
        name = obj.findtext("name", "").strip()
        if name not in VOC_CLASSES:
            raise VOCLayoutError(f"annotation {str(path)!r}: unknown class {name!r}")
        if obj.find("bndbox") is None:
            raise VOCLayoutError(f"annotation {str(path)!r}: an object {name!r} has no bndbox")
        for field, default in OPTIONAL_FIELDS.items():
            element = obj.find(field)
            if element is None:
                element = ET.SubElement(obj, field)
            if not (element.text or "").strip():
                element.text = default
    return ET.tostring(root, encoding="unicode") + "\n"


def write_split_view(voc: Path, spec: SplitSpec, root: Path) -> Path:
    """Write ``root/<name>/{ImageSets/Main/<name>.txt, Annotations/, JPEGImages →}``; returns the folder.

    Register it with ``register_pascal_voc(spec.name, folder, spec.name, year)``.

    Raises:
        VOCLayoutError: an image or annotation is missing or unreadable (named in the message).
    """
    folder = root / spec.name
    (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (folder / "Annotations").mkdir(exist_ok=True)
    for image_id in spec.ids:
        if not (voc / "JPEGImages" / f"{image_id}.jpg").is_file():
            raise VOCLayoutError(f"image {str(voc / 'JPEGImages' / image_id)!r}.jpg of split "
                                 f"{spec.source_split!r} is missing")
        write_text_atomic(folder / "Annotations" / f"{image_id}.xml",
                          _filled_annotation(voc / "Annotations" / f"{image_id}.xml"))
    link, images = folder / "JPEGImages", (voc / "JPEGImages").resolve()
    if link.is_symlink() and link.resolve() != images:  # a view from an earlier run on another data root
        link.unlink()
    if not link.exists():
        link.symlink_to(images, target_is_directory=True)
    write_text_atomic(folder / "ImageSets" / "Main" / f"{spec.name}.txt", "\n".join(spec.ids) + "\n")
    return folder
