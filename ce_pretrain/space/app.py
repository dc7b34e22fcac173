"""Hugging Face Space entry point: serves ``ce-pretrain demo`` for one model (the Space runs ``python app.py``).

Written into a Space folder by ``ce-pretrain demo --model MODEL --write-space DIR``, which fills in ``MODEL``: a Hub
repository id, or ``"model"`` when the weights were copied next to this file. The Space sets
``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``, which the demo follows.
"""

import sys

from ce_pretrain.cli import main

MODEL = "model"
POOL = None  # a folder of images in the Space for the context-neighbours tab, or None

if __name__ == "__main__":
    sys.exit(main(["demo", "--model", MODEL, *(["--pool", POOL] if POOL else [])]))
