"""TraceRL (trajectory-aware RL; Wang et al., 2025, dLLM-RL).

Followed: the official code (Gen-Verse/dLLM-RL: ``train/rl_sdar.py``, ``train/rl_llada.py``, ``train/
rl_dream.py``, ``reward/rl_reward.py``, ``configs/rl_*.yaml``) where it and the paper differ.

The rollout's step map is replayed with shrinkage s: every s consecutive denoising steps form one round, and
each round is one training row: the state before the round (the tokens of earlier rounds revealed) scoring
the tokens the round committed (the ``trajectory`` estimator with ``shrink``). Rows are normalised as the
official scripts do for the model's attention, chosen by the policy's family (``policy.block_size``):

    block-causal (SDAR, TraDo; ``rl_sdar.py``):   loss = mean_rows [ (−Σ_targets min(ρA, clip(ρ)A) + β Σ k3) / L₁ ]
    full attention (LLaDA, Dream; ``rl_llada.py``): loss = mean_rows [ −Σ_targets min(ρA, clip(ρ)A) / n_row + β Σ k3 ]

with n_row the row's number of targets and L₁ the length of the longest response of the step's whole batch
(the official code pads the step's re-tokenised responses together; not the sampler's gen_length). The "KL"
term is taken against π_old, as in the released policy scripts (only old log-probs exist there), so with a
single update per batch (μ = 1) it is zero. The targets are every response token before the first EOS: the
official code drops the pad token, which is the EOS of every family it trains, so an end-of-turn token counts
and the EOS does not (``response_mask: before_eos``).

Advantages and the data filter (``rl_reward.py``): a completion that never ends (no stop token within the
generation length: the official code's "length ≥ max − 5") scores as wrong (reward 0, ``correct`` false);
A is the group z-score of the rewards with the population std and no epsilon (a uniform group gets 0); then
every group whose accuracy (fraction of correct completions) lies outside ``accuracy_filter`` = [0.2, 0.8] is
dropped, which drops every uniform group of a binary reward. Defaults (SDAR/TraDo recipe): ε = 0.2, β = 0.01,
shrink 1, μ = 1 (lr 1e-6, G = 16, temperature 1.0); the LLaDA/Dream recipes use shrink 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, masked_mean, register_algorithm
from dare_gym.algorithms.options import (
    Clip,
    ClipHigher,
    GroupAdvantages,
    KLPenalty,
    Likelihood,
    ResponseMask,
    RolloutCorrection,
)
from dare_gym.core.buffer import CORRECT, ENDED
from dare_gym.core.distributed import global_max
from dare_gym.core.losses import clipped_surrogate, kl_penalty, trace_rows

LONGEST_RESPONSE = "tracerl.longest_response"  # buffer column: L₁ of the step's batch, on every row


@dataclass
class TraceRLConfig(RolloutCorrection, ResponseMask, Likelihood, GroupAdvantages, KLPenalty, ClipHigher, Clip,
                    AlgorithmConfig):
    beta: float = 0.01
    """weight of the k3 term against π_old (the released scripts' "KL"; zero with μ = 1)"""
    advantage_std_eps: float = 0.0
    estimator: str = "trajectory"
    estimator_kwargs: dict = field(default_factory=lambda: {"shrink": 1})
    response_mask: str = "before_eos"
    accuracy_filter: list[float] | None = field(default_factory=lambda: [0.2, 0.8])
    """[low, high]: drop groups whose accuracy lies outside it (the official 0.2 / 0.8); null: keep every group"""
    unfinished_is_wrong: bool = True
    """a completion with no stop token (it hit the length limit) scores as wrong: reward 0, not correct"""

    def check(self):
        if self.accuracy_filter is not None:
            bounds = list(self.accuracy_filter)
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not 0 <= bounds[0] <= bounds[1] <= 1:
                raise ValueError(f"accuracy_filter must be [low, high] with 0 <= low <= high <= 1, or null, got "
                                 f"{self.accuracy_filter!r}")


def row_normaliser(policy, longest_response: int) -> int | None:
    """L₁ for block-causal models, None (each row's own target count) for full attention."""
    return max(int(longest_response), 1) if policy.block_size is not None else None


def tracerl_loss(surrogate: torch.Tensor, kl: torch.Tensor | None, step_masks: list[torch.Tensor], *, beta: float,
                 padded_length: float | None) -> torch.Tensor:
    """TraceRL's loss over its rows (``surrogate``: the per-token −clipped surrogate; ``kl``: per-token k3).

    Block-causal models (dLLM-RL ``rl_sdar.py``, ``padded_length`` = L₁): mean_rows [(Σ −s + β Σ k3) / L₁].
    Full attention (``rl_llada.py``, ``padded_length=None``): each row normalised by its own number of targets
    and the KL summed per row, mean_rows [Σ −s / n_row + β Σ k3] (ALGORITHMS.md J)."""
    sums, counts = trace_rows(surrogate, step_masks)
    policy = sums / (counts.clamp(min=1) if padded_length is None else padded_length)
    if kl is None or beta == 0:
        return policy.mean()
    kl_sums, _ = trace_rows(kl, step_masks)
    kl_rows = kl_sums if padded_length is None else kl_sums / padded_length
    return (policy + beta * kl_rows).mean()



@register_algorithm("tracerl", TraceRLConfig)
class TraceRL(PolicyGradient):
    population_std = True

    @property
    def needs_reference(self) -> bool:
        return False  # the KL term is against π_old

    def advantages(self, buffer, group_size):
        config = self.config
        if config.unfinished_is_wrong and ENDED in buffer.columns:
            unfinished = ~buffer.columns[ENDED]
            buffer.reward = torch.where(unfinished, torch.zeros_like(buffer.reward), buffer.reward)
            if CORRECT in buffer.columns:
                buffer.columns[CORRECT] = buffer.columns[CORRECT] & ~unfinished
        buffer = super().advantages(buffer, group_size)
        if config.accuracy_filter is not None:
            if CORRECT not in buffer.columns:
                raise ValueError("tracerl's accuracy_filter needs the env's verdicts (the buffer's 'correct' column); "
                                 "set accuracy_filter: null to train without it")
            low, high = config.accuracy_filter
            accuracy = buffer.columns[CORRECT].float().view(-1, group_size).mean(dim=1)
            outside = (accuracy < low) | (accuracy > high)
            buffer = buffer.discard(outside.repeat_interleave(group_size))
        return buffer

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        longest = global_max(int(buffer.completion_mask.sum(dim=1).max())) if len(buffer) else 0
        buffer.columns[LONGEST_RESPONSE] = torch.full((len(buffer),), longest, dtype=torch.long)
        super().prepare(policy, reference, buffer, generator, micro_batch_size)

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
        longest = int(batch.columns[LONGEST_RESPONSE][0]) if LONGEST_RESPONSE in batch.columns else surrogate.shape[1]
        loss = tracerl_loss(surrogate, kl, targets, beta=config.beta, padded_length=row_normaliser(policy, longest))
        return loss, metrics
