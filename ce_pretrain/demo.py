"""``ce-pretrain demo``: a web page to inpaint an uploaded image and to browse the context neighbours of Fig. 8.

Built on Gradio, an optional dependency (``pip install "ce-pretrain[demo]"``) imported only when the page is built,
so ``import ce_pretrain`` never needs it. The page calls the same functions as ``ce-pretrain inpaint``
(:func:`ce_pretrain.inpaint.inpaint`: the model sees the image at its own resolution, and its fill is pasted back
into the hole of the full-resolution original) and ``ce-pretrain neighbors``
(:func:`ce_pretrain.neighbors.context_neighbors`). The model is loaded once, by the command, before the server starts.

Uploads go through a plain file box rather than Gradio's image components, so that every file — not an image,
empty, too many pixels — is read by :func:`read_upload` and answered with a message in the page, never with a
server traceback.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .figure import save_png, to_pil
from .inpaint import ImageReadError, inpaint, load_image, resize
from .masks import MASK_KINDS
from .model import ContextEncoder

__all__ = ["BRUSH", "GRADIO_MISSING", "MAX_PIXELS", "MAX_UPLOAD", "DemoCallbacks", "add_demo_arguments", "brush_mask",
           "build_demo", "read_upload", "require_gradio", "serve"]

BRUSH = "brush"
# 24 Mpx (a 6000×4000 photo): the full-resolution float copies of one request stay under ~2 GB
MAX_PIXELS = 24_000_000
MAX_UPLOAD = "50mb"
GRADIO_MISSING = 'the demo needs Gradio: pip install "ce-pretrain[demo]"'
# the painting canvas shows a preview of at most this side; the painted mask is enlarged back to full resolution
PREVIEW_SIDE = 1024
# downloads older than this are deleted (Gradio keeps its own copy in its cache, cleaned on the same period)
KEEP_SECONDS = 3600


def require_gradio():
    """Import Gradio, or explain how to install it (``ImportError`` with one line)."""
    try:
        import gradio
    except ImportError as e:
        raise ImportError(GRADIO_MISSING) from e
    return gradio


def read_upload(path: str | os.PathLike | None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an uploaded file as an RGB image ``[3, H, W]`` in [0, 1], checking its size before decoding it.

    Raises:
        ImageReadError: no file, an empty file, not an image, or more than ``max_pixels`` pixels.
    """
    if path is None:
        raise ImageReadError("upload an image first")
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(f"{path.name} is empty (0 bytes)")
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path.name} is not an image this demo can read") from e
    if width * height > max_pixels:
        raise ImageReadError(f"{path.name} is {width}×{height} px ({width * height / 1e6:.0f} Mpx); this demo takes "
                             f"images of at most {max_pixels / 1e6:.0f} Mpx")
    return load_image(path)


def brush_mask(layers: list[np.ndarray] | None, size: tuple[int, int]) -> torch.Tensor:
    """The hole painted on the editor's layers: bool ``[1, H, W]`` at ``size`` = ``(H, W)``, True = dropped.

    Args:
        layers: RGBA ``[h, w, 4]`` uint8 arrays of the painted layers (any painted pixel, of any colour, is hole);
            ``h × w`` may be the preview's size, the mask is enlarged (nearest) to ``size``.
        size: the full-resolution image's ``(H, W)``.

    Raises:
        ValueError: nothing was painted.
    """
    painted = None
    for layer in layers or []:
        if layer is None or layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        alpha = torch.from_numpy(layer[..., 3] > 0)
        painted = alpha if painted is None else painted | alpha  # layers of one editor share the canvas size
    if painted is None or not painted.any():
        raise ValueError("paint the hole on the image first (or pick another mask)")
    return F.interpolate(painted[None, None].float(), size=size, mode="nearest")[0] > 0.5


def _seed(value: float | None) -> int:
    """The seed box's value as a generator seed: empty → 0, anything else wrapped into [0, 2³²)."""
    return int(value) % 2**32 if value is not None and math.isfinite(value) else 0


def _preview(image: torch.Tensor) -> np.ndarray:
    """The image as uint8 ``[h, w, 3]``, shrunk so its longer side is at most :data:`PREVIEW_SIDE`."""
    h, w = image.shape[-2:]
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    small = resize(image[None], (max(1, round(h * scale)), max(1, round(w * scale))))[0]
    return np.asarray(to_pil(small))


class DemoCallbacks:
    """The page's callbacks, bound to one model (and an optional pool of images for the neighbours tab).

    Each takes the components' values (the upload's path, the mask kind, the seed...) and returns theirs; expected
    failures (a bad upload, nothing painted, a hole the model cannot fill) become a message, never an exception.
    """

    def __init__(self, model: ContextEncoder, pool: torch.Tensor | None, pool_names: list[str], max_pixels: int):
        self.model = model.eval()
        self.pool, self.pool_names = pool, pool_names
        self.max_pixels = max_pixels
        self.out_dir = Path(tempfile.mkdtemp(prefix="ce-pretrain-demo-"))
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)

    def _download_path(self, stem: str) -> Path:
        """A fresh file for one result (a folder per request keeps the user's file name), old ones swept away."""
        for old in self.out_dir.iterdir():
            if time.time() - old.stat().st_mtime > KEEP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.out_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder / f"{stem}_inpainted.png"

    def describe(self) -> str:
        c = self.model.config
        device = next(self.model.parameters()).device
        hole = (f"predicts the central {self.model.pred_size}² px" if self.model.pred_size < self.model.image_size
                else "predicts the whole image")
        return (f"**Model**: `{c.get('backbone')}` context encoder, {self.model.image_size}² px input, {hole}; "
                f"running on `{device}`. Any image is resized to the model's input, and the filled hole is pasted "
                "back into the original at full resolution: outside the hole every pixel is the original's.")

    def on_upload(self, path: str | None):
        """A new file: show it on the painting canvas, or say why it cannot be used."""
        try:
            image = read_upload(path, self.max_pixels)
        except ImageReadError as e:
            return None, f"⚠️ {e}"
        h, w = image.shape[-2:]
        preview = _preview(image)
        return ({"background": preview, "layers": [], "composite": preview},
                f"Loaded {Path(path).name}: {w}×{h} px. Pick a mask and press **Inpaint**.")

    @torch.no_grad()
    def on_inpaint(self, path: str | None, kind: str, seed: float | None, editor: dict | None):
        """Inpaint the upload: (masked input, result, original, download file, message)."""
        nothing = (None, None, None, None)
        try:
            image = read_upload(path, self.max_pixels)
            if kind == BRUSH:
                mask = brush_mask((editor or {}).get("layers"), tuple(image.shape[-2:]))
            elif kind in MASK_KINDS:
                mask = kind
            else:
                raise ValueError(f"unknown mask {kind!r}")
            generator = torch.Generator().manual_seed(_seed(seed))
            res = inpaint(self.model, image, mask, generator)
        except (ImageReadError, ValueError) as e:
            return *nothing, f"⚠️ {e}"
        except (torch.cuda.OutOfMemoryError, MemoryError):
            return *nothing, "⚠️ out of memory for this image; try a smaller one"
        masked, filled, original = to_pil(res.masked), to_pil(res.result), to_pil(res.image)
        out = save_png(filled, self._download_path(Path(path).stem))
        hole = res.mask.float().mean().item()
        return masked, filled, original, str(out), (f"Filled a {kind} hole covering {100 * hole:.1f}% of the "
                                                    f"{filled.width}×{filled.height} px image.")

    @torch.no_grad()
    def on_neighbors(self, path: str | None, kind: str, seed: float | None, k: float):
        """Fig. 8 for the upload: (grid, message)."""
        from .neighbors import context_neighbors, neighbor_grid

        if self.pool is None:
            return None, "⚠️ no pool of images: start the demo with --pool FOLDER"
        try:
            image = read_upload(path, self.max_pixels)
            query = resize(image[None], self.model.image_size)
            k = max(1, min(int(k), len(self.pool)))
            found, masks = context_neighbors(self.model, query, self.pool, mask=kind, k=k, seed=_seed(seed))
        except (ImageReadError, ValueError) as e:
            return None, f"⚠️ {e}"
        grid = neighbor_grid(query, self.pool, found, masks, self.model.mean.flatten().cpu())
        names = ", ".join(self.pool_names[i] for i in found["context encoder"][0].tolist())
        return grid, f"Nearest by the encoder's features of the context: {names}"


def build_demo(
    model: ContextEncoder,
    pool: torch.Tensor | None = None,
    pool_names: list[str] | None = None,
    max_pixels: int = MAX_PIXELS,
):
    """The demo page (a ``gradio.Blocks``), not yet launched.

    Args:
        model: the context encoder, on the device it should run on.
        pool: images ``[M, 3, S, S]`` at the model's resolution for the neighbours tab (uint8 or floats in [0, 1]);
            ``None`` leaves the tab with a note.
        pool_names: a name per pool image, shown with the neighbours found.
        max_pixels: largest upload accepted, in pixels.
    """
    gr = require_gradio()
    names = pool_names or [f"#{i}" for i in range(len(pool) if pool is not None else 0)]
    demo_fns = DemoCallbacks(model, pool, names, max_pixels)
    cache = (KEEP_SECONDS, KEEP_SECONDS)  # Gradio deletes its cached uploads and results after an hour, hourly
    with gr.Blocks(title="ce-pretrain demo", analytics_enabled=False, delete_cache=cache) as page:
        gr.Markdown("# Context encoder inpainting\nPathak et al., *Context Encoders: Feature Learning by "
                    "Inpainting*, CVPR 2016 — served by `ce-pretrain demo`.")
        gr.Markdown(demo_fns.describe())
        with gr.Row():
            upload = gr.File(label="Image (any format PIL reads: JPEG, PNG, WebP, TIFF, BMP...)", type="filepath",
                             elem_id="upload", scale=1)
            status = gr.Markdown("Upload an image to start.", elem_id="status")
        with gr.Tabs():
            with gr.Tab("Inpaint"):
                with gr.Row():
                    kind = gr.Radio([*MASK_KINDS, BRUSH], value="center", label="Mask", elem_id="mask-kind",
                                    info="random masks are drawn from the seed; 'brush' uses what you paint below")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                editor = gr.ImageEditor(
                    label="Paint the hole here (mask: brush)", type="numpy", image_mode="RGBA", sources=[],
                    transforms=[], layers=False, format="png", elem_id="editor",
                    brush=gr.Brush(colors=["rgb(255, 0, 255)"], color_mode="fixed"))
                run = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
                with gr.Row():
                    masked = gr.Image(label="masked input", type="pil", format="png", elem_id="masked")
                    result = gr.Image(label="prediction (pasted into the hole)", type="pil", format="png",
                                      elem_id="result")
                    original = gr.Image(label="original", type="pil", format="png", elem_id="original")
                download = gr.DownloadButton("Download the inpainted image (PNG, full resolution)",
                                             elem_id="download")
            with gr.Tab("Context neighbours (Fig. 8)"):
                gr.Markdown("The pool images whose *context* (hole hidden) is closest to the upload's, in the "
                            "encoder's feature space and in HOG space; each tile shows their hole region. "
                            + (f"Pool: {len(pool)} images." if pool is not None else
                               "No pool was given: start the demo with `--pool FOLDER`."))
                with gr.Row():
                    nn_kind = gr.Radio(list(MASK_KINDS), value="center", label="Mask", elem_id="nn-mask-kind")
                    nn_seed = gr.Number(value=0, precision=0, label="Seed")
                    nn_k = gr.Slider(1, 10, value=5, step=1, label="Neighbours per method")
                nn_run = gr.Button("Find neighbours", variant="primary", elem_id="neighbors",
                                   interactive=pool is not None)
                nn_grid = gr.Image(label="context nearest neighbours", type="pil", format="png", elem_id="nn-grid")

        upload.upload(demo_fns.on_upload, upload, [editor, status])
        upload.clear(lambda: (None, "Upload an image to start."), None, [editor, status])
        run.click(demo_fns.on_inpaint, [upload, kind, seed, editor], [masked, result, original, download, status])
        nn_run.click(demo_fns.on_neighbors, [upload, nn_kind, nn_seed, nn_k], [nn_grid, status])
    return page


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``ce-pretrain demo`` after ``--model`` and ``--device``."""
    parser.add_argument("--port", type=int, default=None,
                        help="port to serve on (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (needs internet; off by default)")
    parser.add_argument("--pool", metavar="FOLDER", help="images searched in the context-neighbours tab")
    parser.add_argument("--pool-limit", type=int, default=500, help="use the first N pool images (default: 500)")
    parser.add_argument("--write-space", metavar="DIR",
                        help="instead of serving, write a Hugging Face Space (app.py, requirements.txt, README.md) "
                             "that serves this model")


def serve(model: ContextEncoder, args: argparse.Namespace) -> int:
    """Build the page for ``model`` and serve it until interrupted (the body of ``ce-pretrain demo``)."""
    from .inpaint import load_folder

    pool, names = None, None
    if args.pool:
        try:
            pool, files = load_folder(args.pool, model.image_size, args.pool_limit)
        except ImageReadError as e:
            raise ImageReadError(f"--pool: {e}") from e
        names = [str(f.relative_to(args.pool)) for f in files]
    page = build_demo(model, pool, names)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
                ssr_mode=False, quiet=True, prevent_thread_lock=True)
    print(f"ce-pretrain demo: serving {args.model} at {page.local_url}" + (f" and {page.share_url}" if page.share_url
                                                                          else "") + " (Ctrl+C to stop)", flush=True)
    page.block_thread()
    return 0
