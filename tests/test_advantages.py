"""learner.advantages: GRPO group-normalised advantages, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import grpo_advantages


def test_hand_computed_unbiased_std():
    # group [1, 0, 0, 1]: mean .5, unbiased std sqrt(4 * .25 / 3) = sqrt(1/3)
    # group [1, 0, 0, 0]: mean .25, unbiased std sqrt((.5625 + 3 * .0625) / 3) = .5
    adv, zero_groups = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    s = math.sqrt(1 / 3) + 1e-6
    assert adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert adv[1].tolist() == pytest.approx([x / 0.500001 for x in (0.75, -0.25, -0.25, -0.25)])
    assert zero_groups == 0


def test_equal_reward_groups_are_exactly_zero_and_counted():
    # 0.1 seven times: its float32 mean is not exactly 0.1, yet the advantages must be exactly 0
    rewards = torch.tensor([[0.1] * 7, [1.0] * 7, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    adv, zero_groups = grpo_advantages(rewards)
    assert zero_groups == 2
    assert (adv[:2] == 0).all() and (adv[2] != 0).all()
    assert adv[2].sum().item() == pytest.approx(0, abs=1e-6)  # centred


def test_dtype_and_bad_input():
    adv, _ = grpo_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.bfloat16))
    s = math.sqrt(0.5) + 1e-6  # two rewards 1, 0: unbiased std sqrt(.5)
    assert adv.dtype == torch.float32 and adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s])
    with pytest.raises(ValueError, match="n >= 2"):
        grpo_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="n >= 2"):
        grpo_advantages(torch.ones(8))
    with pytest.raises(ValueError, match="finite"):
        grpo_advantages(torch.tensor([[1.0, math.nan]]))
