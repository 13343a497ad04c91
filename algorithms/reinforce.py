"""REINFORCE with a group baseline: the smallest algorithm in the zoo, and the template for a new one.

It composes an existing estimator (UniGRPO's ``random_ratio``) with a new loss — no ratio, no clipping, no
reference: minimise −A_i · ℓ̂_ik averaged over the scored tokens, one update per batch. This file is all
it takes: the module registers itself, and ``dare-gym compare --algorithms d1 reinforce`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, masked_mean, register_algorithm
from dare_gym.algorithms.options import GroupAdvantages, Likelihood, ResponseMask, TokenAggregation


@dataclass
class ReinforceConfig(ResponseMask, Likelihood, TokenAggregation, GroupAdvantages, AlgorithmConfig):
    num_iterations: int = 1  # on-policy: REINFORCE has no importance correction
    estimator: str = "random_ratio"


@register_algorithm("reinforce", ReinforceConfig)
class Reinforce(PolicyGradient):
    def loss(self, policy, batch, iteration):
        inputs = self.model_inputs(batch, policy.device)
        scores = self.estimator.token_logp(policy.logits, inputs, self.noise(batch, iteration, policy.device))
        mask = inputs.completion_mask.bool() & scores.scored
        advantages = batch.advantage.to(scores.logp.device)[:, None]
        loss = self.aggregate(-advantages * scores.logp, mask, batch)
        return loss, {"entropy": masked_mean(scores.entropy, mask), "scored_tokens": float(mask.sum())}
