
import pytest
import torch
from huggingface_hub import ModelCard

from ce_pretrain import ContextEncoder
from ce_pretrain.model_card import TEMPLATE, render_model_card, write_model_card

ARGS = dict(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8))
SECTIONS = ["## Model details", "## Intended uses", "## Training data", "## Training procedure", "## Evaluation",
            "## Limitations", "## How to load"]
EVALUATION = {"metrics": {"context encoder": {"l1": 9.37, "l2": 1.96, "psnr": 18.58},
                          "NN-inpainting (HOG)": {"l1": 19.92, "l2": 6.92, "psnr": None}},
              "num_images": 100, "num_pool": 500, "mask": "center", "image_size": 64}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ContextEncoder(**ARGS)


def test_template_ships_in_the_package_and_has_every_placeholder():
    from importlib import resources

    text = (resources.files("ce_pretrain") / "model_card_template.md").read_text(encoding="utf-8")
    assert text == TEMPLATE and text.startswith("---\n$front_matter\n---")


def test_front_matter_is_valid_hub_metadata(model):
    training = {"data": "frgfm/imagenette", "steps": 1000, "lr": 1e-3, "mask": "random-region"}
    card = ModelCard(render_model_card(model.config, training, EVALUATION))
    data = card.data.to_dict()
    assert data["library_name"] == "ce-pretrain" and data["license"] == "mit"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert {"context-encoder", "self-supervised", "dcgan_encoder"} <= set(data["tags"])
    assert data["datasets"] == ["frgfm/imagenette"]
    assert data["metrics"] == ["mae", "mse", "psnr"]
    assert "base_model" not in data  # from scratch: no link to a model called "none"


def test_local_data_paths_stay_out_of_the_datasets_field(model, tmp_path):
    text = render_model_card(model.config, {"data": str(tmp_path)})
    assert "datasets" not in ModelCard(text).data.to_dict()
    assert str(tmp_path) in text  # but the card still says what it was trained on


def test_body_has_every_section_and_the_numbers(model):
    training = {"data": "frgfm/imagenette", "steps": 1000, "lr": 1e-3}
    text = render_model_card(model.config, training, EVALUATION, model_id="me/ce")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "$" not in text  # every placeholder filled
    assert "| steps | 1000 |" in text and "| lr | 0.001 |" in text
    assert "| context encoder | 9.37 % | 1.96 % | 18.58 |" in text
    assert "| NN-inpainting (HOG) | 19.92 % | 6.92 % | ∞ |" in text
    assert "100 held-out images" in text
    assert 'ContextEncoder.from_pretrained("me/ce")' in text


def test_unknown_training_and_evaluation_are_said_so(model):
    text = render_model_card(model.config)
    assert "Not evaluated yet" in text and "not recorded" in text


def test_write_model_card_replaces_the_default_card(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    default = (tmp_path / "ckpt" / "README.md").read_text()
    assert "## How to load" in default  # save_pretrained already writes ce-pretrain's card
    path = write_model_card(tmp_path / "ckpt", model, training={"steps": 7}, evaluation=EVALUATION)
    assert path == tmp_path / "ckpt" / "README.md"
    text = path.read_text()
    assert "| steps | 7 |" in text and "18.58" in text
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    n = sum(p.numel() for p in model.parameters())
    assert f"{n:,}" in text


def test_push_to_hub_card_kwargs_reach_the_card(model, tmp_path):
    # push_to_hub passes model_card_kwargs to save_pretrained; exercised locally (no network in tests)
    model.save_pretrained(tmp_path / "c", model_card_kwargs=dict(training={"steps": 3}, evaluation=EVALUATION))
    text = (tmp_path / "c" / "README.md").read_text()
    assert "| steps | 3 |" in text and "9.37 %" in text
