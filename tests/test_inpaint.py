import numpy as np
import pytest
import torch
from PIL import Image

from ce_pretrain import ContextEncoder
from ce_pretrain.inpaint import ImageReadError, fill_holes, hole_errors, inpaint, load_image, load_mask, resize

FULL = dict(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8))
CENTRE = dict(backbone="dcgan_encoder", image_size=64, pred_size=32, overlap=4, bottleneck="fc", bottleneck_dim=32,
              decoder_channels=[64, 32, 16, 8], backbone_kwargs=dict(width=8))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ContextEncoder(**FULL).eval()


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0, 1, (3, 3))
    img = c[:, 0, None, None] * x / w + c[:, 1, None, None] * y / h + c[:, 2, None, None] * 0.3
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_any_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(gradient(20, 30)).convert(mode).save(path)
    x = load_image(path)
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_16_bit_grayscale_keeps_its_range(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png")
    assert x.shape == (3, 1, 3)
    assert torch.allclose(x[:, 0], torch.tensor([0.0, 128 / 255, 1.0]).expand(3, 3))


def test_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200  # a colour hidden under alpha 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert torch.equal(load_image(tmp_path / "t.png"), torch.ones(3, 2, 2))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(gradient(10, 40))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 40, 10)


def test_unreadable_and_missing_files_raise_image_read_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "absent.png")


def test_mask_must_have_the_image_size_and_a_hole(tmp_path):
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", (10, 12)).all()
    with pytest.raises(ImageReadError, match="same size"):
        load_mask(tmp_path / "m.png", (10, 13))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="no hole"):
        load_mask(tmp_path / "empty.png", (10, 12))


@pytest.mark.parametrize("size", [(37, 90), (64, 64), (200, 150)])
@pytest.mark.parametrize("kind", ["center", "random-region"])
def test_only_the_hole_changes_at_full_resolution(model, size, kind):
    image = torch.from_numpy(gradient(*size)).permute(2, 0, 1).float() / 255
    res = inpaint(model, image, kind, torch.Generator().manual_seed(1))
    assert res.result.shape == image.shape and res.mask.shape == (1, *size)
    assert res.mask.any() and not res.mask.all()
    outside = ~res.mask.expand_as(image)
    assert torch.equal(res.result[outside], image[outside])  # bit-identical context
    assert not torch.equal(res.result[~outside], image[~outside])  # the hole was filled
    assert torch.equal(res.masked[outside], image[outside])
    assert 0 <= float(res.result.min()) and float(res.result.max()) <= 1


def test_user_mask_is_the_hole_exactly(model):
    image = torch.rand(3, 50, 70)
    mask = torch.zeros(1, 50, 70, dtype=torch.bool)
    mask[:, 10:13, 20:41] = True  # thin: it must survive the shrink to the model's grid
    res = inpaint(model, image, mask)
    assert torch.equal(res.mask, mask)
    changed = (res.result != image).any(0, keepdim=True)
    assert not (changed & ~mask).any()
    assert changed.any()


def test_centre_model_refuses_holes_outside_its_prediction():
    torch.manual_seed(0)
    centre = ContextEncoder(**CENTRE).eval()
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., :5, :5] = True
    with pytest.raises(ValueError, match="central 32×32"):
        fill_holes(centre, torch.rand(1, 3, 64, 64), mask)
    res = inpaint(centre, torch.rand(3, 100, 80), "center")  # the overlap band lies outside the hole
    side = 32 - 2 * 4
    assert res.mask.float().mean().item() == pytest.approx(side * side / 64 / 64, abs=0.02)


def test_resize_is_identity_at_the_same_size():
    x = torch.rand(2, 3, 16, 16)
    assert resize(x, 16) is x
    assert resize(x, (8, 24)).shape == (2, 3, 8, 24)


def test_metrics_perfect_fill_and_hand_computed_errors():
    target = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    perfect = hole_errors(target.clone(), target, mask)
    assert torch.equal(perfect["l1"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(perfect["l2"], torch.zeros(2, dtype=torch.float64))
    assert torch.isinf(perfect["psnr"]).all()

    pred = target.clone()
    pred[mask.expand_as(pred)] += 0.1  # uniform 0.1 error in the hole
    pred[:, :, 0, 0] += 0.9  # errors outside the hole do not count
    e = hole_errors(pred, target, mask)
    assert torch.allclose(e["l1"], torch.full((2,), 10.0, dtype=torch.float64))
    assert torch.allclose(e["l2"], torch.full((2,), 1.0, dtype=torch.float64))
    assert torch.allclose(e["psnr"], torch.full((2,), 20.0, dtype=torch.float64))


def test_metrics_refuse_empty_masks():
    with pytest.raises(ValueError, match="at least one"):
        hole_errors(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bool))
