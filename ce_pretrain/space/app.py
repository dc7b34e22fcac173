"""Hugging Face Space entry point: serves ``ce-pretrain demo`` for one model (the Space runs ``python app.py``).

Written into a Space folder by ``ce-pretrain demo --model MODEL --write-space DIR``, which fills in ``MODEL``: a Hub
repository id, or ``"model"`` when the weights were copied next to this file. The Space sets
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, which the demo follows.
"""

import sys
from pathlib import Path

from ce_pretrain.cli import main

MODEL = "model"
POOL = None  # a folder of images next to this file for the context-neighbours tab, or None

HERE = Path(__file__).resolve().parent


def arguments() -> list[str]:
    """The ``ce-pretrain`` command line: folders next to this file win over Hub repository ids of the same name."""
    model = str(HERE / MODEL) if (HERE / MODEL).is_dir() else MODEL
    return ["demo", "--model", model, *(["--pool", str(HERE / POOL)] if POOL else [])]


if __name__ == "__main__":
    sys.exit(main(arguments()))
