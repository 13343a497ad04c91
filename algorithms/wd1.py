"""wd1 (weighted policy optimisation; Tang, Dolga, Yoon & Bogunovic, 2025): a ratio-free weighted log-likelihood.

GRPO on a diffusion LM needs log π_θ, log π_old and log π_ref, each only approximable, and an error in π_old's
estimate sits in the ratio's denominator. wd1 scores only the current policy: each completion's (approximate)
log-likelihood is pushed up with a weight that grows with its advantage and pushed down with a weight that grows
with minus its advantage, both weights a softmax over the completion's group:

    w⁺_i = softmax_{j∈g}(ψ A_j)_i,   w⁻_i = softmax_{j∈g}(−ψ A_j)_i,   ℓ_i = Σ_k m_ik log π_θ(o_i^k | ·)

    loss = (1/#groups) Σ_g Σ_{i∈g} (w⁻_i − w⁺_i) · ℓ_i

with A = r − mean_g(r) (no std), ℓ_i the d1 estimate (the completion fully masked, each prompt token masked with
p = 0.15, a fresh prompt mask for each of the μ inner iterations) summed over the completion tokens up to and
including the first EOS. A group whose rewards are all equal has w⁺ = w⁻ and adds nothing. No ratio, no
clipping, no KL (the official reference-policy variant scores π_ref but leaves it out of its loss).

Followed: the official code (github xiaohangt/wd1 at 0898985, ``wd1/trainers/rev_grpo_trainer.py``
``compute_loss``, trainer type ``wll_d1_neg`` of ``run/wll_NP_*.sh``, ``wd1/train.yaml``) and the paper
(arXiv 2507.08838). The official softmax runs over one device's micro-batch, which its settings make exactly one
group of G = 6 (per-device batch 6 = num_generations); here it runs over each group whatever the minibatch, and
the loss is the mean over groups of the group sums as the official micro-steps average them. ψ (the paper's
temperature on the advantage) is 1 in the official code, as here. Defaults: μ = 12, p_mask_prompt = 0.15 (lr
3e-6, G = 6, 256 tokens, 128 steps; run settings). wd1++ (the paper's step-wise variant) has no released code
and is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import GroupAdvantages, Likelihood, ResponseMask, is_number

WEIGHT = "wd1_weight"  # per row: (N/#groups) · (w⁻ − w⁺), the coefficient of ℓ_i in the loss


@dataclass
class WD1Config(ResponseMask, Likelihood, GroupAdvantages, AlgorithmConfig):
    num_iterations: int = 12
    scale_rewards: str = "none"
    estimator: str = "d1"
    """likelihood estimator (d1's one-step estimator masks the prompt with p_mask_prompt, default 0.15)"""
    response_mask: str = "through_eos"
    psi: float = 1.0
    """ψ: the advantage's temperature in the softmax weights w± = softmax(±ψA) over the group (official: 1)"""

    def check(self):
        if not (is_number(self.psi) and self.psi > 0):
            raise ValueError(f"psi must be a number > 0, got {self.psi!r}")


def wd1_coefficients(advantages: torch.Tensor, group_ids: torch.Tensor, psi: float) -> torch.Tensor:
    """[N] (N/#groups) · (w⁻_i − w⁺_i) per row, w± the softmax of ±ψA over the row's group, so that the row mean
    of coefficient · ℓ is the mean over groups of Σ_{i∈g} (w⁻_i − w⁺_i) ℓ_i however rows are split."""
    coefficients = torch.zeros_like(advantages)
    groups = torch.unique(group_ids)
    for group in groups:
        rows = group_ids == group
        scaled = psi * advantages[rows]
        coefficients[rows] = torch.softmax(-scaled, dim=0) - torch.softmax(scaled, dim=0)
    return coefficients * len(group_ids) / len(groups)


@register_algorithm("wd1", WD1Config)
class WD1(PolicyGradient):
    """Advantages and their group-softmax weights once per batch; each iteration a fresh d1 prompt mask and
    one forward of π_θ (no π_old, no π_ref)."""

    # uniform noise (DiffusionGemma): the one-pass estimator becomes uniform_corruption, as for d1
    supported_noise = ("mask", "uniform")

    @property
    def needs_reference(self) -> bool:
        return False

    def advantages(self, buffer, group_size):
        buffer = super().advantages(buffer, group_size)
        buffer.columns[WEIGHT] = wd1_coefficients(buffer.advantage, buffer.group_id, self.config.psi)
        return buffer

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        self.store_noise(policy, buffer, generator)  # only each iteration's prompt mask: nothing else is scored

    def loss(self, policy, batch, iteration):
        inputs = self.model_inputs(batch, policy.device)
        scores = self.estimator.token_logp(policy.logits, inputs, self.noise(batch, iteration, policy.device))
        mask = inputs.completion_mask.bool() & scores.scored  # through the first EOS
        log_likelihood = (scores.logp * mask).sum(dim=1)  # ℓ_i: a sum over tokens, as the official code
        coefficients = batch.columns[WEIGHT].to(log_likelihood.device)
        rows = batch.active_rows().to(log_likelihood.device)
        loss = (coefficients * log_likelihood * rows).sum() / rows.sum().clamp(min=1)
        metrics = {"log_likelihood": float((log_likelihood.detach() * rows).sum() / rows.sum().clamp(min=1)),
                   "scored_tokens": float(mask.sum())}
        if scores.entropy is not None:
            metrics["entropy"] = float((scores.entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, metrics
