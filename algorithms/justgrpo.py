"""JustGRPO (Ni et al., 2025): GRPO with the exact likelihood of a left-to-right order.

Rollouts decode one token per step, left to right (``block_length=1``, ``steps=gen_length``), which makes the
sequence log-probability exact: log π(o) = Σ_t log f(o^t | c, o^{<t}, M…M), one forward per position (the
``exact_ar`` estimator), every padded position included. The loss is the clipped surrogate summed over
tokens and scaled by 1/(L · N_valid), N_valid the number of samples with a non-zero advantage; z-score
advantages (std + 1e-4); uniform groups add nothing and are not counted in N_valid; one update per batch
(on-policy), no KL. Followed: the official code (LeapLabTHU/JustGRPO ``grpo.py``, ``train.py``). Defaults:
ε = 0.2 (lr 5e-6, G = 16, temperature 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Clip, ClipHigher, DualClip, GroupAdvantages, ResponseMask
from dare_gym.core.estimators import make_estimator


@dataclass
class JustGRPOConfig(ResponseMask, GroupAdvantages, DualClip, ClipHigher, Clip, AlgorithmConfig):
    response_mask: str = "all"


@register_algorithm("justgrpo", JustGRPOConfig)
class JustGRPO(PolicyGradient):
    rollout_order = "left_to_right"  # one token per step, left to right: each sampler says how (Sampler.left_to_right)

    def build_estimator(self, mask_token_id: int):
        return make_estimator("exact_ar", mask_token_id=mask_token_id)  # the exact left-to-right likelihood

    def loss(self, policy, batch, iteration):
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        advantages = batch.advantage.to(scores.logp.device)
        mask = scores.scored & inputs.completion_mask.bool()  # response_mask all: the whole padded length
        per_token, metrics = self.token_loss(scores, old_logp, ref_logp, advantages, mask)
        valid_samples = (advantages != 0).sum().clamp(min=1)
        scale = 1.0 / (per_token.shape[1] * valid_samples)
        return (per_token * mask).sum() * scale, metrics
