"""TraceRL (trajectory-aware RL; Wang et al., 2025, dLLM-RL).

The rollout's step map is replayed with shrinkage s: every s consecutive denoising steps form one round, and
each round is one training row: the state before the round (the tokens of earlier rounds revealed) scoring
the tokens the round committed (the ``trajectory`` estimator with ``shrink``). Rows are normalised as the
official scripts do for the model's attention, chosen by the policy's family (``policy.block_size``):

    block-causal (SDAR, TraDo; ``rl_sdar.py``):   loss = mean_rows [ (−Σ_targets min(ρA, clip(ρ)A) + β Σ k3) / L₁ ]
    full attention (LLaDA, Dream; ``rl_llada.py``): loss = mean_rows [ −Σ_targets min(ρA, clip(ρ)A) / n_row + β Σ k3 ]

with L₁ the padded response length and n_row the row's number of targets. The "KL" term is taken against
π_old, as in the released policy scripts (only old log-probs exist there), so with a single update per batch
(μ = 1) it is zero. A is the group z-score with the population std.
Defaults (SDAR/TraDo recipe): ε = 0.2, β = 0.01, shrink 1; the LLaDA/Dream recipe uses shrink 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_gym.algorithms.base import PolicyGradient, PolicyGradientConfig, masked_mean, register_algorithm
from dare_gym.losses import clipped_surrogate, kl_penalty, tracerl_loss


@dataclass
class TraceRLConfig(PolicyGradientConfig):
    num_iterations: int = 1
    beta: float = 0.01
    epsilon: float = 0.2
    estimator: str = "trajectory"
    estimator_kwargs: dict = field(default_factory=lambda: {"shrink": 1})


def row_normaliser(policy, padded_length: int) -> int | None:
    """L₁ for block-causal models, None (each row's own target count) for full attention."""
    return padded_length if policy.block_size is not None else None


@register_algorithm("tracerl", TraceRLConfig)
class TraceRL(PolicyGradient):
    population_std = True

    @property
    def needs_reference(self) -> bool:
        return False  # the KL term is against π_old

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs, scores, old_logp, _ = self.score(policy, batch, iteration)
        valid = inputs.completion_mask.bool()
        advantages = batch.advantage.to(scores.logp.device)[:, None]
        surrogate, clip_active = clipped_surrogate(scores.logp, old_logp, advantages, epsilon_low=config.epsilon,
                                                   epsilon_high=config.epsilon_high,
                                                   log_ratio_clamp=config.log_ratio_clamp)
        kl = kl_penalty(scores.logp, old_logp, config.kl_estimator, clamp=config.kl_clamp)
        targets = [draw.masked & valid for draw in scores.draws]
        mask = valid & scores.scored
        metrics = {"clip_fraction": masked_mean(clip_active, mask), "kl_old": masked_mean(kl.detach(), mask),
                   "rows": float(sum(int(t.any(dim=1).sum()) for t in targets)),
                   "entropy": masked_mean(scores.entropy, mask)}
        surrogate = self.correct_for_rollout(surrogate, old_logp, batch, mask, metrics)
        loss = tracerl_loss(surrogate, kl, targets, beta=config.beta,
                            padded_length=row_normaliser(policy, surrogate.shape[1]))
        return loss, metrics
