"""JustGRPO (Ni et al., 2025): GRPO with the exact likelihood of a left-to-right order.

Rollouts decode one token per step, left to right (``block_length=1``, ``steps=gen_length``), which makes the
sequence log-probability exact: log π(o) = Σ_t log f(o^t | c, o^{<t}, M…M), one forward per position (the
``exact_ar`` estimator), every padded position included. The loss is the clipped surrogate summed over
tokens and scaled by 1/(L · N_valid), N_valid the number of samples with a non-zero advantage; z-score
advantages; one update per batch (on-policy), no KL. Defaults: ε = 0.2, lr 5e-6, G = 16.
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import PolicyGradient, PolicyGradientConfig, register_algorithm


@dataclass
class JustGRPOConfig(PolicyGradientConfig):
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    estimator: str = "exact_ar"


@register_algorithm("justgrpo", JustGRPOConfig)
class JustGRPO(PolicyGradient):
    rollout_settings = {"block_length": 1, "steps": "gen_length"}  # left to right, one token per step

    def loss(self, policy, batch, iteration):
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        advantages = batch.advantage.to(scores.logp.device)
        mask = scores.scored  # the whole padded length
        per_token, metrics = self.token_loss(scores, old_logp, ref_logp, advantages, mask)
        valid_samples = (advantages != 0).sum().clamp(min=1)
        scale = 1.0 / (per_token.shape[1] * valid_samples)
        return (per_token * mask).sum() * scale, metrics
