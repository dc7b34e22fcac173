"""A Hugging Face Space for ``ce-pretrain demo``: ``app.py``, ``requirements.txt`` and the Space's ``README.md``.

The Space runs the same code as the command: its ``app.py`` (this folder's :mod:`ce_pretrain.space.app`, with the
model filled in) calls ``ce-pretrain demo --model MODEL``. A local model folder is copied into the Space as
``model/``; a Hub repository id is loaded from the Hub when the Space starts.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from huggingface_hub import constants

from ..atomic import write_atomic, write_text_atomic

__all__ = ["write_space"]

REQUIREMENTS = """\
# ce-pretrain with its demo extra (Gradio); until ce-pretrain is on PyPI, point this at its repository:
#   ce-pretrain[demo] @ git+https://github.com/<owner>/ce-pretrain
ce-pretrain[demo]
"""

README = """\
---
title: Context encoder inpainting
emoji: 🖌️
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: mit
{models}---

Inpainting with a context encoder (Pathak et al., *Context Encoders: Feature Learning by Inpainting*, CVPR 2016,
[arXiv:1604.07379](https://arxiv.org/abs/1604.07379)), served by `ce-pretrain demo`: upload an image, pick a mask
(centre, random block, random region or one you paint), and see the model's fill pasted back at full resolution.
"""


def _gradio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:  # not installed where the Space is written: any 6.x serves the page
        return "6.0.0"


def write_space(directory: str | os.PathLike, model: str) -> Path:
    """Write a Space folder that serves ``model``.

    Args:
        directory: the Space's folder (created; files in it are replaced).
        model: a folder written by ``save_pretrained`` (copied into ``directory/model``) or a Hub repository id.

    Returns:
        ``directory`` as a path.

    Raises:
        FileNotFoundError: ``model`` is a folder without ``config.json`` and ``model.safetensors``.
    """
    out = Path(directory)
    source = Path(model).expanduser()
    if source.is_dir():
        files = [source / "config.json", source / constants.SAFETENSORS_SINGLE_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model!r} is not a model folder (no {', '.join(missing)})")
        (out / "model").mkdir(parents=True, exist_ok=True)
        for f in files:
            write_atomic(out / "model" / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
        ref, models = "model", ""
    else:
        out.mkdir(parents=True, exist_ok=True)
        ref, models = model, f"models:\n  - {model}\n"
    app = (Path(__file__).parent / "app.py").read_text(encoding="utf-8")
    app = re.sub(r'^MODEL = .*$', f"MODEL = {ref!r}", app, count=1, flags=re.MULTILINE)
    write_text_atomic(out / "app.py", app)
    write_text_atomic(out / "requirements.txt", REQUIREMENTS)
    write_text_atomic(out / "README.md", README.format(gradio_version=_gradio_version(), models=models))
    return out
