"""Losses and advantages against the worked numbers of reference/ALGORITHMS.md and values by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.advantages import group_advantages, zero_variance_groups
from dare_gym.losses import aggregate, clipped_surrogate, kl_penalty, masked_diffusion_sft_loss

# The toy batch of ALGORITHMS.md §0: G = 2, L = 3, r = (1, 0).
LOGP = torch.tensor([[-0.5, -1.0, -0.2], [-1.2, -0.3, -2.0]], dtype=torch.float64)
OLD = torch.tensor([[-0.6, -1.0, -0.4], [-1.0, -0.3, -2.5]], dtype=torch.float64)
REF = torch.tensor([[-0.7, -0.9, -0.2], [-1.2, -0.5, -2.0]], dtype=torch.float64)
REWARDS = torch.tensor([1.0, 0.0], dtype=torch.float64)
ALL_VALID = torch.ones(2, 3)


def test_advantages_of_the_toy_batch():
    assert group_advantages(REWARDS, 2, scale_rewards="none").tolist() == [0.5, -0.5]
    assert group_advantages(REWARDS, 2, scale_rewards="group") == pytest.approx([0.707007, -0.707007], abs=1e-6)
    assert group_advantages(REWARDS, 2, scale_rewards="none", baseline="rloo").tolist() == [1.0, -1.0]


def test_batch_scaling_uses_the_std_of_the_whole_batch():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std().item()
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]
    assert group_advantages(rewards, 2, scale_rewards="batch") == pytest.approx(expected, rel=1e-6)


def test_zero_variance_groups_are_found():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.2, 0.2])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True]


def test_bad_advantage_options_name_the_value():
    with pytest.raises(ValueError, match="scale_rewards must be one of .* got 'std'"):
        group_advantages(REWARDS, 2, scale_rewards="std")
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(REWARDS, 3)


def test_d1_worked_example():
    advantages = group_advantages(REWARDS, 2, scale_rewards="none")[:, None]
    per_token, _ = clipped_surrogate(LOGP, OLD, advantages, epsilon_low=0.5)
    assert per_token == pytest.approx(torch.tensor([[-0.552585, -0.5, -0.610701], [0.409365, 0.5, 0.824361]]), abs=1e-6)
    k3 = kl_penalty(LOGP, REF, "k3")
    assert k3 == pytest.approx(torch.tensor([[0.018731, 0.005171, 0.0], [0.0, 0.018731, 0.0]]), abs=1e-6)
    loss = aggregate(per_token + 0.04 * k3, ALL_VALID, "bnpo")
    assert loss.item() == pytest.approx(0.012024, abs=1e-6)


def test_d1_clipping_example():
    advantages = group_advantages(REWARDS, 2, scale_rewards="none")[:, None]
    per_token, clip_active = clipped_surrogate(LOGP, OLD, advantages, epsilon_low=0.2)
    assert per_token[0, 2].item() == pytest.approx(-0.6)  # ρ = 1.2214 clipped to 1.2, A = 0.5
    assert clip_active.tolist() == [[0, 0, 1], [0, 0, 0]]  # o₂'s ρ = 1.65 with A < 0 is not clipped
    loss = aggregate(per_token + 0.04 * kl_penalty(LOGP, REF), ALL_VALID, "bnpo")
    assert loss.item() == pytest.approx(0.013808, abs=1e-6)


def test_coupled_grpo_toy_loss_with_rloo_advantages():
    advantages = group_advantages(REWARDS, 2, scale_rewards="none", baseline="rloo")[:, None]
    per_token, _ = clipped_surrogate(LOGP, OLD, advantages, epsilon_low=0.5)
    assert aggregate(per_token, ALL_VALID, "bnpo").item() == pytest.approx(0.023480, abs=1e-6)
    loss = aggregate(per_token + 0.01 * kl_penalty(LOGP, REF), ALL_VALID, "bnpo")
    assert loss.item() == pytest.approx(0.023551, abs=1e-6)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    logp, old = torch.tensor([[2.0]]), torch.tensor([[0.0]])  # ρ = e² ≈ 7.39
    unclipped, _ = clipped_surrogate(logp, old, torch.tensor([[-1.0]]), epsilon_low=0.2)
    capped, _ = clipped_surrogate(logp, old, torch.tensor([[-1.0]]), epsilon_low=0.2, dual_clip=3.0)
    assert unclipped.item() == pytest.approx(math.exp(2.0))
    assert capped.item() == pytest.approx(3.0)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # u = ref - logp = -0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_aggregation_worked_example():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.25)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "dapo", num_active_tokens=10).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate(per_token, mask, "mean")


def _logits_with_cross_entropy(values: list[float]) -> torch.Tensor:
    """Two-class logits [0, d] whose cross-entropy against class 0 is each given value."""
    return torch.tensor([[0.0, math.log(math.exp(v) - 1)] for v in values])


def test_sft_loss_worked_example():
    # L_ans = 4, t = 0.5, masked CE values {2.0, 1.0}: (3.0 / 0.5) / 4 = 1.5.
    logits = _logits_with_cross_entropy([2.0, 1.0, 7.0, 7.0])[None]  # the unmasked CEs must not count
    targets = torch.zeros(1, 4, dtype=torch.long)
    masked = torch.tensor([[True, True, False, False]])
    loss = masked_diffusion_sft_loss(logits, targets, masked, torch.tensor([0.5]), torch.tensor([4]))
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
