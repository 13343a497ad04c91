"""ESPO (ELBO-based sequence-level policy optimisation; 2025): GSPO for diffusion LMs, on the ELBO.

Each completion's log-likelihood is ESPO's paired ELBO 𝓑 (the ``elbo_pair`` estimator: k/(L+1) tokens
masked, stratified across the batch, plus the complementary pass; ``mc_num`` pairs). The importance ratio is
per sequence and length-normalised, ρ_i = exp((𝓑_i − 𝓑_old,i)/L), through PPO clipping, averaged over
sequences; the KL is k2 on the raw ELBO, divided by L:

    loss = −(1/B) Σ_i min(ρ_i A_i, clip(ρ_i) A_i) + β · (1/(B·L)) Σ_i ½ (𝓑_i − 𝓑_ref,i)²

A = RLOO, no std scaling, uniform groups kept with A = 0. Every completion position counts (the official ELBO
sums over all generated positions, EOS padding included; L is the generation length). Followed: the official
code (ML-GSAI/ESPO ``espo/espo_trainer.py``, ``recipes/run_math_llada.sh``). Defaults (MATH): ε = 0.2,
β = 1e-3, μ = 8, mc_num 2, G = 16 (lr 3e-6, temperature 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Clip, GroupAdvantages, Likelihood, ResponseMask, is_number
from dare_gym.core.losses import importance_ratio


@dataclass
class ESPOConfig(ResponseMask, Likelihood, GroupAdvantages, Clip, AlgorithmConfig):
    num_iterations: int = 8
    beta: float = 1e-3
    """weight of the sequence KL ½(𝓑 − 𝓑_ref)²/L (k2 on the ELBO; 0: no reference model is kept)"""
    kl_clamp: float | None = None
    """clamp each sequence's KL term to at most c; null: no clamp"""
    baseline: str = "rloo"
    scale_rewards: str = "none"
    estimator: str = "elbo_pair"
    estimator_kwargs: dict = field(default_factory=lambda: {"mc_num": 2})
    response_mask: str = "all"

    def check(self):
        if not (is_number(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        if self.kl_clamp is not None and not (is_number(self.kl_clamp) and self.kl_clamp > 0):
            raise ValueError(f"kl_clamp must be a number > 0 or null, got {self.kl_clamp!r}")


def espo_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, ref_elbo: torch.Tensor | None, advantages: torch.Tensor,
              length: torch.Tensor, *, epsilon: float, beta: float, log_ratio_clamp: float | None = None,
              kl_clamp: float | None = None) -> torch.Tensor:
    """ESPO: a sequence ratio ρ = exp((𝓑 − 𝓑_old)/L) through PPO clipping, mean over sequences, plus
    β · Σ ½(𝓑 − 𝓑_ref)² / (B·L) (k2 on the raw ELBO, then divided by L; with ``kl_clamp`` each sequence's term
    is clamped to it)."""
    length = length.to(elbo.dtype)
    ratio = importance_ratio((elbo - old_elbo) / length, log_ratio_clamp)
    policy = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages).mean()
    if ref_elbo is None or beta == 0:
        return policy
    kl = 0.5 * (elbo - ref_elbo).square() / length
    return policy + beta * (kl if kl_clamp is None else kl.clamp(max=kl_clamp)).mean()



@register_algorithm("espo", ESPOConfig)
class ESPO(PolicyGradient):
    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def loss(self, policy, batch, iteration):
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        present = scores.scored & inputs.completion_mask.bool()  # response_mask all: every generated position
        elbo = scores.sequence(present)
        old_elbo = (old_logp * present).sum(dim=1)  # same masks: the scored positions agree
        ref_elbo = None if ref_logp is None else (ref_logp * present).sum(dim=1)
        length = present.sum(dim=1).clamp(min=1)  # L: the generation length under response_mask all
        loss = espo_loss(elbo, old_elbo, ref_elbo, batch.advantage.to(elbo.device), length,
                         epsilon=self.config.epsilon, beta=self.config.beta,
                         log_ratio_clamp=self.config.log_ratio_clamp, kl_clamp=self.config.kl_clamp)
        ratio = ((elbo - old_elbo) / length).detach().exp()
        clipped = ((ratio - 1).abs() > self.config.epsilon).float().mean()
        return loss, {"sequence_ratio": float(ratio.mean()), "clip_fraction": float(clipped)}
