import json

import pytest
import torch

from ce_pretrain import ContextEncoder
from ce_pretrain.evaluate import (
    MEAN,
    MODEL,
    NN_HOG,
    NN_OURS,
    context_nearest_neighbors,
    encoder_features,
    evaluate,
    hog_features,
    mean_fill,
)
from ce_pretrain.inpaint import fill_holes, hole_errors, model_masks

FULL = dict(backbone="dcgan_encoder", image_size=64, backbone_kwargs=dict(width=8))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ContextEncoder(**FULL).eval()


def scenes(n: int, seed: int = 0) -> torch.Tensor:
    """Distinct smooth images with a few shapes: uint8 [n, 3, 64, 64]."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    out = []
    for _ in range(n):
        a = torch.rand(3, 3, generator=g)
        img = a[:, 0, None, None] * x + a[:, 1, None, None] * y + a[:, 2, None, None] * 0.5
        for _ in range(3):
            t, left, s = (torch.rand(3, generator=g) * torch.tensor([48, 48, 24])).long().tolist()
            img[:, t: t + s + 4, left: left + s + 4] = torch.rand(3, 1, 1, generator=g)
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def test_mean_fill_matches_a_hand_computation(model):
    images = torch.empty(2, 3, 64, 64)
    images[0], images[1] = 0.2, 0.9
    result = evaluate(model, images)
    mean = model.mean.flatten()
    hand_l1 = [100 * float((c - mean).abs().mean()) for c in (0.2, 0.9)]
    hand_l2 = [100 * float((c - mean).square().mean()) for c in (0.2, 0.9)]
    assert result.rows[MEAN]["l1"] == pytest.approx(sum(hand_l1) / 2)
    assert result.rows[MEAN]["l2"] == pytest.approx(sum(hand_l2) / 2)
    mask = model_masks(model, "center", 1)
    assert torch.equal(mean_fill(images[:1], mask, mean)[mask.expand(1, 3, -1, -1)].view(3, -1),
                       mean.view(3, 1).expand(3, int(mask.sum())))


def test_model_row_is_the_blended_prediction(model):
    images = scenes(3)
    result = evaluate(model, images)
    truth = images.float() / 255
    masks = model_masks(model, "center", 3)
    expected = hole_errors(fill_holes(model, truth, masks), truth, masks)
    assert result.rows[MODEL]["l1"] == pytest.approx(float(expected["l1"].mean()))
    assert list(result.rows) == [MODEL, MEAN]  # no pool, no NN rows
    assert result.hole_fraction == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ["center", "random-block"])
def test_nn_with_the_query_in_the_pool_retrieves_it(model, kind):
    queries = scenes(4, seed=1)
    pool = torch.cat([scenes(6, seed=2), queries.flip(0)])  # the queries sit at pool indices 9, 8, 7, 6
    masks = model_masks(model, kind, 4, torch.Generator().manual_seed(0))
    mean = model.mean.flatten()
    for describe in (lambda x, m: hog_features(x, m, mean, cell=4), lambda x, m: encoder_features(model, x, m)):
        found = context_nearest_neighbors(queries, pool, masks, describe, k=2)
        assert found.shape == (4, 2)
        assert found[:, 0].tolist() == [9, 8, 7, 6]
    result = evaluate(model, queries, pool, mask=kind)
    for row in (NN_HOG, NN_OURS):
        assert result.rows[row]["l1"] == 0 and result.rows[row]["psnr"] == float("inf")
    # JSON cannot hold infinity: the record carries null instead, and parses strictly
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["metrics"][NN_HOG]["psnr"] is None and record["num_pool"] == 10


def test_neighbours_are_found_from_the_context_alone(model):
    """A pool image with the query's context but another hole beats one with the query's hole but another context."""
    query = scenes(1, seed=3)
    other = scenes(1, seed=4)
    masks = model_masks(model, "center", 1)
    same_context = torch.where(masks, other, query)  # index 0
    same_hole = torch.where(masks, query, other)  # index 1
    pool = torch.cat([same_context, same_hole])
    mean = model.mean.flatten()
    for describe in (lambda x, m: hog_features(x, m, mean, cell=4), lambda x, m: encoder_features(model, x, m)):
        assert context_nearest_neighbors(query, pool, masks, describe, k=1).item() == 0
    result = evaluate(model, query, pool)
    # so NN-inpainting pastes the *other* hole: a real error, unlike a method that peeked
    assert result.rows[NN_OURS]["l1"] > 1


def test_table_lists_every_row_in_the_papers_columns(model):
    result = evaluate(model, scenes(2), scenes(3, seed=5))
    table = result.table()
    assert table.splitlines()[0].split() == ["Method", "Mean", "L1", "Loss", "Mean", "L2", "Loss", "PSNR", "(dB)"]
    for name in (MODEL, MEAN, NN_HOG, NN_OURS):
        assert name in table


def test_wrong_sizes_are_refused(model):
    with pytest.raises(ValueError, match="images must be"):
        evaluate(model, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="pool must be"):
        evaluate(model, torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32))
