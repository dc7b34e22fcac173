"""``--lr-schedule`` / ``--warmup-steps``: the multiplier of each optimizer step."""

import math
from itertools import pairwise

import pytest

from ce_pretrain.schedule import lr_factor


def test_constant_without_warmup_is_the_base_rate():
    assert {lr_factor(t, "constant", 0, 100) for t in range(0, 150, 7)} == {1.0}


def test_warmup_starts_low_and_reaches_the_base_rate_linearly():
    factors = [lr_factor(t, "constant", 10, 100) for t in range(12)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[10:] == [1.0, 1.0]
    assert all(b - a == pytest.approx(0.1) for a, b in pairwise(factors[:10]))


def test_cosine_decays_from_the_end_of_warmup_to_zero_at_the_schedule_end():
    total, warmup = 1000, 100
    factors = [lr_factor(t, "cosine", warmup, total) for t in range(total + 5)]
    assert factors[0] == pytest.approx(0.01) and factors[warmup] == 1.0
    after = factors[warmup:total + 1]
    assert all(b < a for a, b in pairwise(after))  # strictly decreasing
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5)
    assert factors[total - 1] < 1e-4 and factors[total] == 0 and factors[total + 4] == 0
    assert factors[total - 1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="constant, cosine"):
        lr_factor(5, "linear", 0, 10)
