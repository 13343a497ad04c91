"""Losses and advantages against the worked numbers of reference/ALGORITHMS.md and values by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.core.advantages import group_advantages, zero_variance_groups
from dare_gym.core.losses import aggregate, clipped_surrogate, kl_penalty
from dare_gym.core.sft import masked_diffusion_sft_loss

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


def test_log_ratio_clamp_bounds_the_ratio_and_cuts_the_gradient():
    logp = torch.tensor([[30.0, 0.5, -30.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    assert torch.equal(importance_ratio(logp - old), torch.exp(logp - old))  # no clamp: today's ratio
    ratio = importance_ratio(logp - old, 20.0)
    assert ratio[0].tolist() == pytest.approx([math.exp(20.0), math.exp(0.5), math.exp(-20.0)], rel=1e-6)
    per_token, _ = clipped_surrogate(logp, old, torch.tensor([[-1.0]]), epsilon_low=0.2, log_ratio_clamp=20.0)
    per_token.sum().backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(math.exp(0.5))
    with pytest.raises(ValueError, match="log-ratio clamp must be > 0"):
        importance_ratio(logp, 0.0)


def test_kl_clamp_bounds_k3_with_a_finite_gradient():
    """verl clamps k3 to ±10 (and its log-ratio to ±20, so e^u cannot overflow)."""
    logp = torch.tensor([-200.0, -1.0], requires_grad=True)
    ref = torch.tensor([0.0, -1.5])  # u = 200 (e^u overflows float32) and u = −0.5
    unclamped = kl_penalty(logp, ref, "k3")
    assert math.isinf(unclamped[0].item())
    kl = kl_penalty(logp, ref, "k3", clamp=10.0)
    assert kl.tolist() == pytest.approx([10.0, math.exp(-0.5) + 0.5 - 1], rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0].item() == 0.0
    assert kl_penalty(logp, ref, "k2", clamp=10.0)[0].item() == 10.0
    with pytest.raises(ValueError, match="KL clamp must be > 0"):
        kl_penalty(logp, ref, "k3", clamp=-1.0)


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


# ------------------------------------------------------------------- the zoo's losses (ALGORITHMS.md)

from dare_gym.algorithms.bgpo import bgpo_sample_loss  # noqa: E402  (each algorithm's own maths, in its file)
from dare_gym.algorithms.cj_grpo import step_mean_loss  # noqa: E402
from dare_gym.algorithms.dpo import dpo_loss  # noqa: E402
from dare_gym.algorithms.espo import espo_loss  # noqa: E402
from dare_gym.algorithms.mdpo import mdpo_step_advantages, mdpo_step_loss  # noqa: E402
from dare_gym.algorithms.ppo import clipped_value_loss, step_gae  # noqa: E402
from dare_gym.algorithms.spg import reinforce_loss, spg_elbo, spg_eubo  # noqa: E402
from dare_gym.algorithms.tracerl import tracerl_loss  # noqa: E402
from dare_gym.core.losses import importance_ratio, sequence_log_ratio  # noqa: E402


def test_gspo_sequence_ratio():
    logp, old = torch.tensor([[0.1, -0.05, 0.0]]), torch.zeros(1, 3)
    log_ratio = sequence_log_ratio(logp, old, torch.ones(1, 3))
    assert torch.exp(log_ratio) == pytest.approx(torch.full((1, 3), 1.016806), abs=1e-6)


def test_cj_grpo_step_losses():
    advantages = group_advantages(REWARDS, 2, scale_rewards="none")[:, None]
    per_token, _ = clipped_surrogate(LOGP, OLD, advantages, epsilon_low=0.5)
    per_token = per_token + 0.04 * kl_penalty(LOGP, REF)
    step_one = torch.tensor([[True, False, True], [False, True, True]])
    loss = step_mean_loss(per_token, [step_one, ~step_one])
    assert loss.item() == pytest.approx(-0.002285, abs=1e-6)


def test_spg_bounds_and_losses():
    masks = [torch.tensor([[False, True, True], [True, False, True]])]
    elbo = spg_elbo([LOGP], masks)
    eubo = spg_eubo([LOGP], masks, torch.ones(2, 3), beta=1.5)
    assert elbo.tolist() == pytest.approx([-0.6, -1.6])
    assert eubo[1].item() == pytest.approx(-1.329690, abs=1e-6)
    advantages, lengths = torch.tensor([0.5, -0.5]), torch.tensor([3, 3])
    assert reinforce_loss(elbo, advantages, lengths).item() == pytest.approx(-0.25)
    with_eubo = torch.stack([elbo[0], eubo[1]])
    assert reinforce_loss(with_eubo, advantages, lengths).item() == pytest.approx(-0.182422, abs=1e-6)
    mix = torch.stack([elbo[0], 0.5 * eubo[1] + 0.5 * elbo[1]])
    assert mix[1].item() == pytest.approx(-1.464845, abs=1e-6)
    assert reinforce_loss(mix, advantages, lengths).item() == pytest.approx(-0.216211, abs=1e-6)


def test_bgpo_bound_worked_example_and_lower_bound_property():
    elbo = torch.tensor([[-0.50, -0.70], [-1.0, -1.2]])
    old = torch.tensor([[-0.55, -0.65], [-1.1, -1.1]])
    advantages = torch.tensor([0.707007, -0.707007])
    lengths = torch.tensor([3, 3])  # equal lengths: the token mean is the sequence mean of ALGORITHMS.md G
    samples = [bgpo_sample_loss(elbo[:, j], old[:, j], advantages, lengths, epsilon=0.2, dual_clip=3.0)
               for j in range(2)]
    assert [s.item() for s in samples] == pytest.approx([0.019503, -0.015965], abs=1e-6)
    bound = sum(samples) / 2
    assert bound.item() == pytest.approx(0.001769, abs=1e-6)
    # The exact ELBO-ratio loss is 0 here (equal means); BGPO's loss is never below it.
    exact_ratio = torch.exp(elbo.mean(1) - old.mean(1))
    exact = -(exact_ratio * advantages).mean()
    assert bound.item() >= exact.item()


def test_bgpo_token_mean_weighs_sequences_by_length():
    """DARE's token-mean aggregation (section G): each sequence's loss counts once per token. Lengths (3, 1):
    per-sequence losses of sample 1 (−0.742357, 0.781364) give (3·−0.742357 + 0.781364)/4 = −0.361427 (the
    sequence mean was 0.019503); sample 2 (−0.671657, 0.639726) gives −0.343811 (was −0.015965); BGPO's
    loss −0.352619 (was 0.001769)."""
    elbo = torch.tensor([[-0.50, -0.70], [-1.0, -1.2]], dtype=torch.float64)
    old = torch.tensor([[-0.55, -0.65], [-1.1, -1.1]], dtype=torch.float64)
    advantages = torch.tensor([0.707007, -0.707007], dtype=torch.float64)
    lengths = torch.tensor([3, 1])
    samples = [bgpo_sample_loss(elbo[:, j], old[:, j], advantages, lengths, epsilon=0.2, dual_clip=3.0).item()
               for j in range(2)]
    assert samples == pytest.approx([-0.361427, -0.343811], abs=1e-6)
    assert sum(samples) / 2 == pytest.approx(-0.352619, abs=1e-6)


def test_espo_worked_example():
    loss = espo_loss(torch.tensor([-2.4, -4.5]), torch.tensor([-2.7, -4.2]), torch.tensor([-2.5, -4.0]),
                     torch.tensor([1.0, -1.0]), torch.tensor([3, 3]), epsilon=0.2, beta=1e-3)
    assert loss.item() == pytest.approx(-0.100145, abs=1e-6)


def test_dpo_worked_example():
    loss = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-15.0]), torch.tensor([-14.0]), 0.2)
    assert loss.item() == pytest.approx(0.437488, abs=1e-6)


def test_tracerl_loss_block_and_full_attention_paths():
    """ALGORITHMS.md J: one row, two targets, ℓ − ℓ_old = (0.1, −0.05), A = 0.7071, β = 0.01.
    Block-causal (L₁ = 4): (−1.45408 + β·0.006108)/4 = −0.363505. Full attention: −1.45408/2 + β·0.006108 =
    −0.726979 (each row over its own targets, the KL summed per row)."""
    logp = torch.tensor([[0.1, -0.05, 0.0, 0.0]], dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    targets = [torch.tensor([[True, True, False, False]])]
    surrogate, _ = clipped_surrogate(logp, old, torch.tensor([[0.7071]], dtype=torch.float64), epsilon_low=0.2)
    kl = kl_penalty(logp, old)
    assert tracerl_loss(surrogate, kl, targets, beta=0.01, padded_length=4).item() == pytest.approx(-0.363505, abs=1e-6)
    assert tracerl_loss(surrogate, kl, targets, beta=0.01, padded_length=None).item() == pytest.approx(-0.726979,
                                                                                                        abs=1e-6)
    # rows of different sizes: full attention weighs each row alike, the block path by its target count
    two_rows = [torch.tensor([[True, False, False, False], [False, False, False, False]]),
                torch.tensor([[False, True, True, True], [False, False, False, False]])]
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64).expand(2, 4)
    assert tracerl_loss(per_token, None, two_rows, beta=0.0, padded_length=None).item() == pytest.approx((1 + 3) / 2)
    assert tracerl_loss(per_token, None, two_rows, beta=0.0, padded_length=4).item() == pytest.approx((1 + 9) / 4 / 2)


def test_tracerl_row_loss_worked_example():
    logp = torch.tensor([[0.1, -0.05, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    targets = torch.tensor([[True, True, False, False]])
    surrogate, _ = clipped_surrogate(logp, old, torch.tensor([[0.7071]]), epsilon_low=0.2)
    per_token = surrogate + 0.01 * kl_penalty(logp, old)
    assert (-surrogate[targets]).tolist() == pytest.approx([0.781466, 0.672614], abs=1e-6)
    assert ((per_token * targets).sum() / 4).item() == pytest.approx(-0.363505, abs=1e-6)


def test_justgrpo_gradient_worked_example():
    advantages = group_advantages(REWARDS, 2, scale_rewards="group")
    logp = LOGP.clone().requires_grad_(True)
    per_token, _ = clipped_surrogate(logp, logp.detach(), advantages[:, None], epsilon_low=0.2)
    loss = per_token.sum() / (3 * 2)  # 1 / (L · N_valid)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    assert logp.grad[0].tolist() == pytest.approx([-0.117834] * 3, abs=1e-6)


def test_mdpo_step_advantages_start_from_zero_reward():
    """ALGORITHMS.md H, second case (G = 3, T = 3): R_{−1} = 0, so step 0's difference is R_0 itself (the
    official ``cat([R[:, 0:1], R[:, 1:] − R[:, :-1]]) + 1``). â = (3,2,2), (1.5,2,0), (2,1.5,3)."""
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    advantages = mdpo_step_advantages(rewards, 3)
    assert advantages[:, 0].tolist() == pytest.approx([1.090947, -0.872757, -0.218189], abs=1e-6)
    assert advantages[:, 1].tolist() == pytest.approx([0.577150, 0.577150, -1.154301], abs=1e-6)
    assert advantages[:, 2].tolist() == pytest.approx([0.218204, -1.091018, 0.872814], abs=1e-6)
    # R_{−1} := R_0 (the former reading) would give (1.154301, −0.577150, −0.577150) at step 0
    assert advantages[0, 0].item() != pytest.approx(1.154301, abs=1e-3)


def test_mdpo_step_advantages_and_loss():
    advantages = mdpo_step_advantages(torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]), 2)
    expected = [[0.706907, 0.707007, -0.707007], [-0.706907, -0.707007, 0.707007]]
    assert advantages.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert advantages.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    logp = torch.zeros(2, 3)
    masked = torch.tensor([[True, True, False], [True, True, False]])
    confidence = torch.tensor([[0.9, 0.6, 1.0], [0.8, 0.5, 1.0]])
    loss = mdpo_step_loss(logp, logp, advantages[:, 1], masked, confidence, epsilon=0.2)
    assert loss.item() == pytest.approx(-0.053022, abs=1e-6)


def test_step_gae_and_value_loss_worked_examples():
    advantages, returns = step_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.8]]),
                                   torch.ones(1, 3, dtype=torch.bool))
    assert advantages.tolist()[0] == pytest.approx([0.8, 0.5, 0.2])
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])
    assert clipped_value_loss(torch.tensor(0.6), torch.tensor(0.3), torch.tensor(1.0), 0.2).item() == pytest.approx(0.125)
