"""The ``ce-pretrain`` command: train, inpaint, evaluate, neighbors, card, export, demo.

Thin: argument parsing, loading, and writing; the work is in :mod:`ce_pretrain.inpaint`, :mod:`ce_pretrain.evaluate`,
:mod:`ce_pretrain.neighbors`, :mod:`ce_pretrain.model_card` and :mod:`ce_pretrain.export`. Bad input ends with one
line on stderr (``ce-pretrain: error: ...``) and exit status 2, before anything is written; every output file is
written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .atomic import write_text_atomic

__all__ = ["build_parser", "main"]

PROG = "ce-pretrain"


class CLIError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {name!r} is not usable: {_first_line(e)}") from e
    return device


def _load_model(ref: str, device: torch.device):
    """A ContextEncoder from a ``save_pretrained`` folder or a Hub repository id (errors: one line, see
    :meth:`ContextEncoder.from_pretrained`)."""
    from .model import ContextEncoder, IncompatibleCheckpointError

    _refuse_timm_export(ref)
    try:
        model = ContextEncoder.from_pretrained(ref)
    except (FileNotFoundError, IncompatibleCheckpointError) as e:
        raise CLIError(f"--model {ref!r}: {_first_line(e)}") from e
    except json.JSONDecodeError as e:  # a ValueError too: a truncated or hand-edited config.json
        raise CLIError(f"--model {ref!r}: its config.json is not valid JSON ({_first_line(e)})") from e
    except (ValueError, TypeError) as e:  # a config.json that does not describe a ContextEncoder
        raise CLIError(f"--model {ref!r}: not a ce-pretrain model ({_first_line(e)})") from e
    return model.to(device).eval()


def _refuse_timm_export(ref: str) -> None:
    """A training run's ``timm-encoder/`` (or ``ce-pretrain export``'s folder) holds the encoder alone, which
    cannot inpaint: say so, and where the whole model is, instead of listing the tensors it lacks."""
    config = Path(ref) / "config.json"
    try:
        is_timm = config.is_file() and "architecture" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # from_pretrained reports it
    if is_timm:
        parent = Path(ref).resolve().parent
        hint = f"; the whole model is in {str(parent)!r}" if (parent / "model.safetensors").is_file() else ""
        raise CLIError(f"--model {ref!r} is a timm encoder export (the encoder alone, for "
                       f"timm.create_model('local-dir:...') and transfer), not a ContextEncoder{hint}")


def _check_writable(folder: Path, flag: str) -> None:
    """Fail before any work if ``folder`` cannot be written (read-only, full, a file in the way)."""
    from .checkpoint import check_writable
    from .config import ConfigError

    try:
        check_writable(folder, flag)
    except ConfigError as e:
        raise CLIError(str(e)) from e


def _output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {path!r} exists and is not a folder")
    return out


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, numbered when two images share one (a/x.jpg and b/x.png must not overwrite each other)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:03d}_{s}" for i, s in enumerate(stems)]


# --------------------------------------------------------------------------------------------------- commands
def _cmd_inpaint(args: argparse.Namespace) -> int:
    from .figure import labelled_grid, save_png, to_pil
    from .inpaint import inpaint, load_image, load_mask
    from .masks import MASK_KINDS

    out = _output_dir(args.out)
    model = _load_model(args.model, _device(args.device))
    images = [load_image(p) for p in args.images]
    if args.mask not in MASK_KINDS and not Path(args.mask).is_file():
        raise CLIError(f"--mask {args.mask!r} is neither one of {', '.join(MASK_KINDS)} nor an image file")
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    for path, image in zip(args.images, images, strict=True):
        mask = args.mask if args.mask in MASK_KINDS else load_mask(args.mask, tuple(image.shape[-2:]))
        try:
            results.append(inpaint(model, image, mask, generator))
        except ValueError as e:
            raise CLIError(f"{path}: {_first_line(e)}") from e

    out.mkdir(parents=True, exist_ok=True)
    rows, names = [], _unique_stems([Path(p) for p in args.images])
    for name, res in zip(names, results, strict=True):
        masked, filled = to_pil(res.masked), to_pil(res.result)
        save_png(masked, out / f"{name}_masked.png")
        save_png(filled, out / f"{name}_inpainted.png")
        rows.append([masked, filled, to_pil(res.image)])
    grid = labelled_grid(rows, ["masked input", "inpainted", "original"], row_labels=names, tile=args.tile)
    save_png(grid, out / "grid.png")
    print(f"inpainted {len(results)} image(s) into {out}/ (grid: {out / 'grid.png'})")
    return 0


def _disjoint(data: Sequence[Path], pool: Sequence[Path]) -> None:
    shared = {p.resolve() for p in data} & {p.resolve() for p in pool}
    if shared:
        raise CLIError(f"--pool shares {len(shared)} image(s) with the held-out images (e.g. {sorted(shared)[0]}); "
                       "nearest neighbours would find the query itself")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .inpaint import load_folder

    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise CLIError(f"--json {args.json!r}: folder {str(json_path.parent)!r} does not exist")
    if json_path is not None:
        _check_writable(json_path.parent, "--json folder")
    model = _load_model(args.model, _device(args.device))
    images, files = load_folder(args.data, model.image_size, args.limit)
    pool, pool_files = (None, [])
    if args.pool:
        pool, pool_files = load_folder(args.pool, model.image_size, args.pool_limit)
        _disjoint(files, pool_files)
    try:
        result = evaluate(model, images, pool, mask=args.mask, seed=args.seed, batch_size=args.batch_size)
    except ValueError as e:
        raise CLIError(_first_line(e)) from e
    result.extra.update(model=args.model, data=str(args.data), pool=str(args.pool) if args.pool else None,
                        seed=args.seed)
    pool_note = f", pool of {len(pool_files)}" if args.pool else " (no --pool: NN rows skipped)"
    print(f"Table 1 protocol: {len(files)} held-out images{pool_note}, {args.mask} masks covering "
          f"{100 * result.hole_fraction:.1f}% of each {model.image_size}² image")
    print(result.table())
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from .figure import save_png
    from .inpaint import load_folder
    from .neighbors import context_neighbors, neighbor_grid

    out = Path(args.out)
    if not out.parent.is_dir():
        raise CLIError(f"--output {args.out!r}: folder {str(out.parent)!r} does not exist")
    if out.suffix.lower() != ".png":
        raise CLIError(f"--output {args.out!r} must be a .png file")
    model = _load_model(args.model, _device(args.device))
    queries, query_files = load_folder(args.query, model.image_size, args.limit)
    pool, pool_files = load_folder(args.pool, model.image_size, args.pool_limit)
    _disjoint(query_files, pool_files)
    try:
        found, masks = context_neighbors(model, queries, pool, mask=args.mask, k=args.k, seed=args.seed,
                                         batch_size=args.batch_size)
    except ValueError as e:
        raise CLIError(_first_line(e)) from e
    grid = neighbor_grid(queries, pool, found, masks, model.mean.flatten().cpu(), tile=args.tile)
    save_png(grid, out)
    print(f"nearest neighbours of {len(query_files)} queries among {len(pool_files)} pool images: {out}")
    return 0


def _read_json(path: str | None, flag: str) -> dict | None:
    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CLIError(f"{flag} {path!r} does not exist") from e
    except (OSError, ValueError) as e:
        raise CLIError(f"{flag} {path!r} is not readable JSON: {_first_line(e)}") from e
    if not isinstance(value, dict):
        raise CLIError(f"{flag} {path!r} must hold a JSON object")
    return value


def _cmd_card(args: argparse.Namespace) -> int:
    from .model_card import render_model_card

    training, evaluation = _read_json(args.training, "--training"), _read_json(args.evaluation, "--evaluation")
    model = _load_model(args.model, torch.device("cpu"))
    out = Path(args.out) if args.out else Path(args.model) / "README.md"
    if not out.parent.is_dir():
        raise CLIError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    text = render_model_card(model.config, training, evaluation,
                             model_id=args.repo_id or Path(args.model).name,
                             num_parameters=sum(p.numel() for p in model.parameters()))
    write_text_atomic(out, text)
    print(f"model card written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import save_timm_encoder

    out = _output_dir(args.out)
    source = Path(args.model).expanduser()
    if source.is_dir() and out.exists() and out.resolve() == source.resolve():
        raise CLIError(f"--output-dir {args.out!r} is the model's own folder: exporting there would replace the "
                       "trained model with the bare encoder; choose another folder (e.g. MODEL/timm-encoder)")
    taken = [name for name in ("model.safetensors", "config.json") if (out / name).exists()]
    if taken and not args.overwrite:
        raise CLIError(f"--output-dir {args.out!r} already holds a model ({', '.join(taken)}); pass --overwrite to "
                       "replace it, or choose another folder")
    _check_writable(out, "--output-dir")
    model = _load_model(args.model, torch.device("cpu"))
    save_timm_encoder(model, out)
    print(f"encoder written in timm's layout to {out}/ (load with timm.create_model('local-dir:{out}', "
          "pretrained=True) after `import ce_pretrain`)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.write_space:
        from .space import write_space

        print(f"Hugging Face Space written to {write_space(args.write_space, args.model)}/")
        return 0
    from .demo import GRADIO_MISSING, serve

    if importlib.util.find_spec("gradio") is None:  # before loading the model; importing Gradio takes seconds
        raise CLIError(GRADIO_MISSING)
    return serve(_load_model(args.model, _device(args.device)), args)


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ce-pretrain`` and its subcommands."""
    from .masks import MASK_KINDS

    parser = argparse.ArgumentParser(
        prog=PROG, description="Context encoders (Pathak et al., CVPR 2016): inpaint, evaluate, inspect, publish.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `ce-pretrain train ...` is ce_pretrain/train.py: main() hands its arguments over before parsing them here
    sub.add_parser("train", add_help=False, help="pretrain a context encoder (= ce_pretrain/train.py; see "
                                                 "`ce-pretrain train --help`)")

    def common(p: argparse.ArgumentParser, device: bool = True) -> None:
        p.add_argument("--model", required=True, metavar="DIR_OR_REPO",
                       help="a folder written by save_pretrained, or a Hugging Face repository id")
        if device:
            p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    def masked_search(p: argparse.ArgumentParser, limit: int | None, limit_help: str) -> None:
        """Flags shared by the commands that mask many images and search a pool (evaluate, neighbors)."""
        p.add_argument("--mask", default="center", choices=MASK_KINDS, help="mask kind (default: center, as the paper)")
        p.add_argument("--limit", type=int, default=limit, help=limit_help)
        p.add_argument("--pool-limit", type=int, default=None, help="use the first N pool images")
        p.add_argument("--seed", type=int, default=0, help="seed of random masks")
        p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("inpaint", help="fill the hole of images; writes masked input, result and a grid",
                       description="Fill the hole of each image: the prediction is blended into the untouched "
                                   "context and pasted back at the image's own resolution.")
    common(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files of any size and mode")
    p.add_argument("--mask", default="center", metavar="KIND_OR_PNG",
                   help=f"{' | '.join(MASK_KINDS)} | a mask image of the images' size, white = hole (default: center)")
    p.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of random masks")
    p.add_argument("--tile", type=int, default=256, help="side of each tile of grid.png in pixels")
    p.set_defaults(func=_cmd_inpaint)

    p = sub.add_parser("evaluate", help="the paper's Table 1: L1, L2, PSNR over the hole, with baselines",
                       description="Mean L1 and L2 error over the hole (% of the pixel range) and PSNR (dB) on "
                                   "held-out images, for the model, the constant-mean fill and, with --pool, "
                                   "nearest-neighbour inpainting with HOG and with the encoder's features.")
    common(p)
    p.add_argument("--data", required=True, metavar="FOLDER", help="held-out images")
    p.add_argument("--pool", metavar="FOLDER", help="other images for the nearest-neighbour baselines")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    masked_search(p, limit=None, limit_help="use the first N held-out images")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("neighbors", help="Fig. 8: nearest neighbours of a hole from its context, encoder vs HOG",
                       description="For each query, the pool images whose context (hole hidden) is closest in "
                                   "the encoder's feature space and in HOG space, shown as a grid of hole regions.")
    common(p)
    p.add_argument("--query", required=True, metavar="FOLDER", help="query images")
    p.add_argument("--pool", required=True, metavar="FOLDER", help="images to search")
    p.add_argument("--output", "--out", dest="out", required=True, metavar="GRID.png", help="the figure")
    p.add_argument("-k", "--k", type=int, default=5, help="neighbours per method (default: 5)")
    p.add_argument("--tile", type=int, default=128, help="side of each tile in pixels")
    masked_search(p, limit=8, limit_help="use the first N query images (default: 8)")
    p.set_defaults(func=_cmd_neighbors)

    p = sub.add_parser("card", help="write the Hugging Face model card of a model folder",
                       description="Render the model card (README.md) from the model's config, the training "
                                   "run's settings and the numbers of `ce-pretrain evaluate --json`.")
    common(p, device=False)
    p.add_argument("--training", metavar="JSON", help="training flags and statistics (a JSON object)")
    p.add_argument("--evaluation", metavar="JSON", help="the output of `ce-pretrain evaluate --json`")
    p.add_argument("--repo-id", help="repository id shown in the loading examples (default: the folder name)")
    p.add_argument("--output", "--out", dest="out", metavar="PATH",
                   help="where to write the card (default: MODEL/README.md)")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("export", help="write the encoder in timm's Hub layout (config.json + model.safetensors)")
    common(p, device=False)
    p.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model already in the output folder (never the source model's own folder)")
    p.set_defaults(func=_cmd_export)

    from .demo import add_demo_arguments

    p = sub.add_parser("demo", help="serve a web page to inpaint uploaded images (needs the demo extra: Gradio)")
    common(p)
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ce-pretrain``; returns the exit status (2 for bad input, with one line on stderr)."""
    from .data import ImageReadError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main([str(a) for a in argv[1:]], prog=f"{PROG} train")
    args = build_parser().parse_args([str(a) for a in argv])
    for flag in ("limit", "pool_limit", "k", "batch_size", "tile", "port"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            print(f"{PROG}: error: --{flag.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ImageReadError) as e:
        print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # writing outputs: a full disk, a read-only folder
        print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
        return 2
