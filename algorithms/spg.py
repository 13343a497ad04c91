"""SPG (sandwiched policy gradient; Wang et al., 2025): REINFORCE with a lower bound for good samples and an
upper bound for bad ones.

No ratio and no clipping. Each completion gets a sequence score ℓ̂_i from block-wise masked forwards (the
``block`` estimator: a clean prefix, one partly masked block, a masked suffix; ``num_t`` draws): for A_i > 0
the ELBO (the mean log-prob of the masked tokens, a lower bound); for A_i ≤ 0 the EUBO (an upper bound, with
``eubo_beta``), the ELBO, or their mix ω·EUBO + (1−ω)·ELBO, so that pushing a bad sample down pushes a bound
that sits above it. The loss weighs sequences by length:

    loss = Σ_i (−A_i · ℓ̂_i · |o_i|) / Σ_i |o_i|

A = r − mean(r), uniform groups kept with A = 0 (they add nothing but count in Σ|o_i|); no KL term; the μ inner
iterations reuse the batch without importance correction. |o_i| and the scored tokens stop at the first EOS,
inclusive (positions after it are fed masked). Followed: the official code (facebookresearch/SPG
``spg/spg_trainer.py``) and the paper. Defaults: μ = 4, mix with ω = 0.5, β_e = 1.5 (GSM8K/MATH; 1.0 sudoku,
2.0 countdown), block 32 (lr 3e-6, G = 6).

Masks follow the paper and the official trainer (``forward_process``, ``block_random``), which DARE matches:
with ``use_mask_prompt`` (the estimator's ``p_mask_clean``, 0.15) only the tokens before block m — the
prompt and the clean earlier blocks — are masked at random; block m keeps its unselected tokens visible.
(An earlier version here also masked those, which neither the official code nor DARE does.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import GroupAdvantages, Likelihood, ResponseMask


@dataclass
class SPGConfig(ResponseMask, Likelihood, GroupAdvantages, AlgorithmConfig):
    num_iterations: int = 4
    scale_rewards: str = "none"
    estimator: str = "block"
    negative_bound: str = "mix"
    """the score of sequences with A ≤ 0: eubo (upper bound), elbo, or mix (ω·EUBO + (1 − ω)·ELBO)"""
    eubo_beta: float = 1.5
    """β_e of the EUBO upper bound"""
    mix_weight: float = 0.5
    """ω: weight of the EUBO in the mix bound"""

    def check(self):
        if self.negative_bound not in ("eubo", "elbo", "mix"):
            raise ValueError(f"negative_bound must be 'eubo', 'elbo' or 'mix', got {self.negative_bound!r}")
        if not 0 <= self.mix_weight <= 1 or self.eubo_beta <= 0:
            raise ValueError(f"need 0 <= mix_weight <= 1 and eubo_beta > 0, got {self.mix_weight!r}, {self.eubo_beta!r}")


def reinforce_loss(sequence_scores: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """SPG's surrogate, no ratio and no clipping, weighted by length: Σ_i −A_i ℓ̂_i |o_i| / Σ_i |o_i|."""
    lengths = lengths.to(sequence_scores.dtype)
    return (-advantages * sequence_scores * lengths).sum() / lengths.sum().clamp(min=1)


def spg_elbo(draw_logp: list[torch.Tensor], draw_masks: list[torch.Tensor]) -> torch.Tensor:
    """SPG's lower bound per sequence: the mean over draws of the mean log-prob of the masked tokens
    (t = |𝓜|/|o| absorbs the 1/t weight)."""
    values = [(logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1) for logp, mask in zip(draw_logp, draw_masks)]
    return torch.stack(values).mean(dim=0)


def spg_eubo(draw_logp: list[torch.Tensor], draw_masks: list[torch.Tensor], valid: torch.Tensor,
             beta: float) -> torch.Tensor:
    """SPG's upper bound per sequence: (1/β) · mean over tokens seen of log mean_j[1[k∈𝓜_j] p_j^β / t_j],
    with t_j the draw's empirical mask ratio |𝓜_j| / |o|. Computed in log space."""
    length = valid.sum(dim=1, keepdim=True).clamp(min=1).to(draw_logp[0].dtype)
    terms = []
    for logp, mask in zip(draw_logp, draw_masks):
        ratio = mask.sum(dim=1, keepdim=True).clamp(min=1) / length
        terms.append(torch.where(mask, beta * logp - torch.log(ratio), torch.full_like(logp, float("-inf"))))
    log_mean = torch.logsumexp(torch.stack(terms), dim=0) - torch.log(torch.tensor(float(len(terms))))
    seen = torch.stack(draw_masks).any(dim=0) & valid.bool()
    per_token = torch.where(seen, log_mean, torch.zeros_like(log_mean))
    return per_token.sum(dim=1) / seen.sum(dim=1).clamp(min=1) / beta



@register_algorithm("spg", SPGConfig)
class SPG(PolicyGradient):
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        self.store_noise(policy, buffer, generator)  # no π_old or π_ref to score: only fresh block masks

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs = self.model_inputs(batch, policy.device)
        scores = self.estimator.token_logp(policy.logits, inputs, self.noise(batch, iteration, policy.device))
        draw_logp = [d.logp for d in scores.draws]
        draw_masks = [d.masked for d in scores.draws]
        valid = inputs.completion_mask.bool()
        elbo = spg_elbo(draw_logp, draw_masks)
        if config.negative_bound == "elbo":
            negative = elbo
        else:
            eubo = spg_eubo(draw_logp, draw_masks, valid, config.eubo_beta)
            negative = eubo if config.negative_bound == "eubo" else config.mix_weight * eubo + (1 - config.mix_weight) * elbo
        advantages = batch.advantage.to(elbo.device)
        sequence_scores = torch.where(advantages > 0, elbo, negative)
        loss = reinforce_loss(sequence_scores, advantages, valid.sum(dim=1))
        return loss, {"elbo": float(elbo.detach().mean()), "scored_tokens": float(scores.scored.sum())}
