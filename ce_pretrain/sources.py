"""Where training images come from: ``--data`` resolved into items before any model is built.

A folder of images, a dataset saved with ``datasets``' ``save_to_disk``, a Hugging Face Hub dataset id, or (no
``--data``) the built-in sample of real photographs shipped inside packages the project depends on.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .data import _BAD_IMAGE, DataSourceError, list_images

__all__ = ["looks_like_hub_id", "open_source", "sample_images"]

# real photographs shipped inside packages the project depends on: (package, path inside it)
_SAMPLES = [
    ("skimage", "data/astronaut.png"), ("skimage", "data/brick.png"), ("skimage", "data/camera.png"),
    ("skimage", "data/chelsea.png"), ("skimage", "data/coffee.png"), ("skimage", "data/coins.png"),
    ("skimage", "data/grass.png"), ("skimage", "data/gravel.png"), ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/moon.png"), ("skimage", "data/motorcycle_left.png"), ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/retina.jpg"), ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]



def sample_images() -> list[Path]:
    """The built-in demo set: real photographs bundled with scikit-image, scikit-learn and matplotlib."""
    found = []
    for package, rel in _SAMPLES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if path.is_file():
            found.append(path)
    if not found:
        raise DataSourceError("no built-in sample images found; install scikit-image, or pass --data FOLDER")
    return found


def _hf_image_column(ds) -> str:
    from datasets import Image as HFImage

    if not ds.features:  # some streamed datasets do not declare their columns
        return "image"
    for name, feature in ds.features.items():
        if isinstance(feature, HFImage):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in ds.features:
            return name
    raise DataSourceError(f"the dataset has no image column (columns: {', '.join(ds.features)})")


_PROBE = 64


def _check_readable(files: Sequence[Path], data: str) -> None:
    """Refuse a folder whose first images are all unreadable (a wrong folder, or files still downloading).

    A few bad files are skipped during training; a folder of nothing but bad files would only fail later, inside
    a loader worker.
    """
    reasons = []
    for path in files[:_PROBE]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as img:
                    img.verify()  # the header and structure, without decoding every pixel
            return
        except _BAD_IMAGE as e:
            reasons.append(f"{path.name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    what = f"none of the {len(files)} image files" if len(files) <= _PROBE else f"none of the first {_PROBE} files"
    raise DataSourceError(f"{what} in {data!r} can be read as an image (e.g. {reasons[0]})")


def looks_like_hub_id(ref: str, owner_required: bool = True) -> bool:
    """``owner/name`` (or, without ``owner_required``, a bare ``name``) as the Hub spells repositories; paths
    (``./x``, ``/x``, ``~/x``, ``a/b/c``) are not. Models need the owner; datasets may be bare names."""
    parts = ref.split("/")
    if len(parts) > 2 or (owner_required and len(parts) != 2):
        return False
    return all(p and p[0] not in ".-~" and all(c.isalnum() or c in "-_." for c in p) for p in parts)


def open_source(data: str | None, split: str = "train", streaming: bool = False) -> tuple[object, str | None, str]:
    """Resolve ``--data`` into ``(items, image_column, description)`` without building any model.

    ``None`` is the built-in sample; an existing folder is searched for images, unless it is a dataset written by
    ``datasets``' ``save_to_disk``; a ``name`` or ``owner/name`` that is no folder is a Hugging Face dataset (with
    ``streaming``, a ``datasets.IterableDataset`` read as it downloads); any other path is a missing folder.

    Raises:
        DataSourceError: with a one-line reason.
    """
    if data is None:
        files = sample_images()
        return files, None, f"built-in demo set: {len(files)} sample photographs (a small demo set, not for real runs)"
    path = Path(data)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as e:
            raise DataSourceError("reading a saved dataset needs `pip install ce-pretrain[datasets]`") from e
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataSourceError(f"dataset {data!r} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        if len(ds) == 0:
            raise DataSourceError(f"dataset {data!r} is empty")
        if streaming:
            return ds.to_iterable_dataset(), _hf_image_column(ds), f"dataset {data!r} ({split}), streamed"
        return ds, _hf_image_column(ds), f"Hugging Face dataset {data!r} ({split}): {len(ds)} images"
    if path.exists() or not looks_like_hub_id(data, owner_required=False):
        files = list_images(path.expanduser())
        _check_readable(files, data)
        return files, None, f"image folder {data!r}: {len(files)} images"
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise DataSourceError(f"{data!r} is no folder; Hugging Face datasets need `pip install "
                              "ce-pretrain[datasets]`") from e
    try:
        ds = load_dataset(data, split=split, streaming=streaming)
        if streaming:
            column = _hf_image_column(ds)
            return ds, column, f"Hugging Face dataset {data!r} ({split}), streamed"
    except DataSourceError:
        raise
    except Exception as e:  # the datasets library raises many types; the message is what the user needs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataSourceError(f"no folder {data!r} here, and the Hugging Face dataset {data!r} cannot be loaded: "
                              f"{reason}") from None
    if len(ds) == 0:
        raise DataSourceError(f"dataset {data!r} is empty")
    return ds, _hf_image_column(ds), f"Hugging Face dataset {data!r} ({split}): {len(ds)} images"
