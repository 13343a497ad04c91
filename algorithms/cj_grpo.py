"""CJ-GRPO (consistency-trajectory GRPO; Yang et al., 2025): GRPO on the rollout's own denoising trajectory.

The rollout records which step committed each token; training replays it (the ``trajectory`` estimator):
one forward per denoising step on the state before that step, scoring the tokens that step committed, so
the likelihood is the one the sampler actually used. The loss is a token mean within each step, then the
mean over steps, so every step weighs the same whatever it unmasks:

    loss = (1/S) Σ_s [ Σ_{i,k} U_{s,ik} (−s_ik + β·k3_ik) / Σ U_s ]

A = r − mean(r), uniform groups kept with A = 0. Every completion position counts (the official loss masks by
the positions each step revealed, EOS padding included: ``response_mask: all``).
Followed: the official code (EOSER-ASS-RL ``cj-grpo/cj_grpo_trainer_eoser_ass.py``, ``compute_loss``) and the
paper. Defaults: ε = 0.5, β = 0.04, μ = 12 (8 for countdown and sudoku); lr 3e-6, G = 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import (
    Clip,
    ClipHigher,
    DualClip,
    GroupAdvantages,
    KLPenalty,
    Likelihood,
    ResponseMask,
    RolloutCorrection,
)


@dataclass
class CJGRPOConfig(RolloutCorrection, ResponseMask, Likelihood, GroupAdvantages, KLPenalty, DualClip, ClipHigher,
                   Clip, AlgorithmConfig):
    num_iterations: int = 12
    beta: float = 0.04
    epsilon: float = 0.5
    scale_rewards: str = "none"
    estimator: str = "trajectory"
    """likelihood estimator (trajectory with shrink 1: every denoising step of the rollout replayed)"""
    response_mask: str = "all"


def step_mean_loss(per_token: torch.Tensor, step_masks: list[torch.Tensor]) -> torch.Tensor:
    """CJ-GRPO's aggregation: a token mean over the batch within each denoising step, then the mean over
    steps, so every step weighs the same whatever it unmasks: (1/S) Σ_s Σ U_s ℓ / Σ U_s."""
    losses = [(per_token * mask).sum() / mask.sum().clamp(min=1) for mask in step_masks if mask.any()]
    return torch.stack(losses).mean()



@register_algorithm("cj_grpo", CJGRPOConfig)
class CJGRPO(PolicyGradient):
    def loss(self, policy, batch, iteration):
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        mask = inputs.completion_mask.bool() & scores.scored
        per_token, metrics = self.token_loss(scores, old_logp, ref_logp, batch.advantage.to(scores.logp.device), mask)
        per_token = self.correct_for_rollout(per_token, old_logp, batch, mask, metrics)
        step_masks = [draw.masked & mask for draw in scores.draws]  # U_s: the tokens step s committed
        metrics["steps"] = float(len(step_masks))
        return step_mean_loss(per_token, step_masks), metrics
