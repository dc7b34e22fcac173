import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ce_pretrain import ContextEncoder
from ce_pretrain.cli import main
from ce_pretrain.export import save_timm_encoder

ARGS = dict(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8))
COMMANDS = ["train", "inpaint", "evaluate", "neighbors", "card", "export"]


def gradient(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0, 1, (3, 3))
    img = c[:, 0, None, None] * x / w + c[:, 1, None, None] * y / h + c[:, 2, None, None] * 0.3
    img[:, h // 4: h // 2, w // 3: w // 2] = rng.uniform(0, 1, (3, 1, 1))  # a shape
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ContextEncoder(**ARGS).save_pretrained(root / "model")
    for folder, n, seed in (("data", 3, 0), ("pool", 4, 10)):
        (root / folder).mkdir()
        for i in range(n):
            Image.fromarray(gradient(40 + 13 * i, 70 - 9 * i, seed + i)).save(root / folder / f"img{i}.png")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-pretrain: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def test_help_lists_the_subcommands():
    done = subprocess.run([sys.executable, "-m", "ce_pretrain", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


def test_inpaint_writes_results_that_keep_the_context(env, tmp_path, capsys):
    images = [env / "data" / "img0.png", env / "data" / "img2.png"]
    code, out, _ = run(capsys, "inpaint", "--model", env / "model", *images, "--out", tmp_path / "o", "--tile", 64)
    assert code == 0 and "2 image(s)" in out
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["grid.png", "img0_inpainted.png", "img0_masked.png", "img2_inpainted.png", "img2_masked.png"]
    for path in images:
        src = np.asarray(Image.open(path).convert("RGB"))
        res = np.asarray(Image.open(tmp_path / "o" / f"{path.stem}_inpainted.png"))
        masked = np.asarray(Image.open(tmp_path / "o" / f"{path.stem}_masked.png"))
        assert res.shape == src.shape  # full resolution
        hole = (masked != src).any(-1)
        changed = (res != src).any(-1)
        assert hole.any() and changed.any()
        assert not (changed & ~hole).any()  # pixels outside the hole are bit-identical
    grid = Image.open(tmp_path / "o" / "grid.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64


def test_inpaint_with_a_mask_image(env, tmp_path, capsys):
    src = np.asarray(Image.open(env / "data" / "img1.png").convert("RGB"))
    mask = np.zeros(src.shape[:2], np.uint8)
    mask[5:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, _ = run(capsys, "inpaint", "--model", env / "model", env / "data" / "img1.png", "--mask",
                     tmp_path / "mask.png", "--out", tmp_path / "o")
    assert code == 0
    res = np.asarray(Image.open(tmp_path / "o" / "img1_inpainted.png"))
    changed = (res != src).any(-1)
    assert changed.any() and not (changed & (mask == 0)).any()


@pytest.mark.parametrize("case", ["missing model", "not a model folder", "bad weights", "bad config", "timm export",
                                  "unreadable image", "missing image", "mask of the wrong size", "unknown mask"])
def test_inpaint_bad_input_is_one_line_and_writes_nothing(env, tmp_path, capsys, case):
    model, images, extra = env / "model", [env / "data" / "img0.png", env / "data" / "img1.png"], []
    if case == "missing model":
        model = tmp_path / "no-model"
    elif case == "not a model folder":
        model = env / "data"
    elif case == "bad weights":
        model = tmp_path / "m"
        shutil.copytree(env / "model", model)
        (model / "model.safetensors").write_bytes(b"garbage")
    elif case == "bad config":  # a truncated config.json is named as such, not "not a ce-pretrain model"
        model = tmp_path / "m"
        shutil.copytree(env / "model", model)
        (model / "config.json").write_text('{"backbone": "dcgan_en')
    elif case == "timm export":  # a run's timm-encoder/ holds the encoder alone: named, with the model's folder
        model = tmp_path / "m" / "timm-encoder"
        shutil.copytree(env / "model", tmp_path / "m")
        save_timm_encoder(ContextEncoder.from_pretrained(str(env / "model")), model)
    elif case == "unreadable image":  # the second image is bad: the first must not be written either
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        images = [env / "data" / "img0.png", tmp_path / "broken.png"]
    elif case == "missing image":
        images = [env / "data" / "img0.png", tmp_path / "absent.jpg"]
    elif case == "mask of the wrong size":
        Image.fromarray(np.full((9, 9), 255, np.uint8)).save(tmp_path / "mask.png")
        extra = ["--mask", tmp_path / "mask.png"]
    elif case == "unknown mask":
        extra = ["--mask", "circle"]
    code, _, err = run(capsys, "inpaint", "--model", model, *images, *extra, "--out", tmp_path / "out")
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()
    if case == "bad config":
        assert "its config.json is not valid JSON" in err
    if case == "timm export":
        assert "is a timm encoder export" in err and f"the whole model is in {str(tmp_path / 'm')!r}" in err


def test_evaluate_prints_the_table_and_writes_json(env, tmp_path, capsys):
    code, out, _ = run(capsys, "evaluate", "--model", env / "model", "--data", env / "data", "--pool", env / "pool",
                       "--json", tmp_path / "eval.json")
    assert code == 0
    for row in ("context encoder", "mean fill", "NN-inpainting (HOG)", "NN-inpainting (encoder features)"):
        assert row in out
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["num_images"] == 3 and record["num_pool"] == 4 and record["mask"] == "center"
    assert set(record["metrics"]["mean fill"]) == {"l1", "l2", "psnr"}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left behind

    # the evaluation goes into the model card
    card = tmp_path / "card.md"
    code, _, _ = run(capsys, "card", "--model", env / "model", "--evaluation", tmp_path / "eval.json", "--out", card)
    assert code == 0
    assert "| mean fill |" in card.read_text()


@pytest.mark.parametrize("case", ["missing data", "pool overlaps data", "unreadable image", "bad json folder"])
def test_evaluate_bad_input(env, tmp_path, capsys, case):
    data, pool, out = env / "data", env / "pool", tmp_path / "eval.json"
    if case == "missing data":
        data = tmp_path / "nothing"
    elif case == "pool overlaps data":
        pool = env / "data"
    elif case == "unreadable image":
        shutil.copytree(env / "data", tmp_path / "d")
        (tmp_path / "d" / "zz.jpg").write_text("not a jpeg")
        data = tmp_path / "d"
    elif case == "bad json folder":
        out = tmp_path / "no" / "eval.json"
    code, _, err = run(capsys, "evaluate", "--model", env / "model", "--data", data, "--pool", pool, "--json", out)
    assert_one_line_error(code, err)
    assert not out.exists()


def test_neighbors_writes_the_figure(env, tmp_path, capsys):
    out = tmp_path / "nn.png"
    code, _, _ = run(capsys, "neighbors", "--model", env / "model", "--query", env / "data", "--pool", env / "pool",
                     "--out", out, "-k", 2, "--tile", 48)
    assert code == 0
    grid = Image.open(out)
    # 3 query rows; columns: context, true hole, 2 encoder neighbours, 2 HOG neighbours
    assert grid.width >= 6 * 48 and grid.height >= 3 * 48


def test_neighbors_bad_input(env, tmp_path, capsys):
    code, _, err = run(capsys, "neighbors", "--model", env / "model", "--query", env / "data", "--pool",
                       tmp_path / "absent", "--out", tmp_path / "nn.png")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "neighbors", "--model", env / "model", "--query", env / "data", "--pool", env / "pool",
                       "--out", tmp_path / "nn.jpg")
    assert_one_line_error(code, err, ".png")
    assert list(tmp_path.iterdir()) == []


def test_card_bad_json_and_export(env, tmp_path, capsys):
    (tmp_path / "t.json").write_text("{not json")
    code, _, err = run(capsys, "card", "--model", env / "model", "--training", tmp_path / "t.json", "--out",
                       tmp_path / "c.md")
    assert_one_line_error(code, err, "JSON")
    assert not (tmp_path / "c.md").exists()
    code, _, _ = run(capsys, "export", "--model", env / "model", "--out", tmp_path / "enc")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]


def test_argument_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["inpaint", "--out", "x"])
    assert info.value.code == 2


def test_train_subcommand_is_the_training_script(capsys):
    from ce_pretrain.train import main as train_main

    assert main(["train", "--max-steps", "0"]) == 2
    via_cli = capsys.readouterr().err.strip()
    assert train_main(["--max-steps", "0"], prog="ce-pretrain train") == 2
    expected = "ce-pretrain train: error: --max-steps must be at least 1, got 0"
    assert via_cli == capsys.readouterr().err.strip() == expected


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "ce_pretrain", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "inpaint" in done.stdout
