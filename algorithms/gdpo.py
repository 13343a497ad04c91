"""GDPO (group diffusion policy optimisation; Rojas, Lin, Rasul, Schneider, Nevmyvaka, Tao & Deng, 2025): GRPO on a
sequence-level ELBO estimated by semi-deterministic Monte Carlo.

The ELBO of a completion is a double integral, over the noise level t and over the random mask at that level; the
paper finds most of its variance comes from t and takes that integral by a deterministic quadrature, leaving one
random mask per node (the ``quadrature`` estimator: Gauss–Legendre nodes t_n on [0, 1], each completion token
masked with probability t_n, weight w_n/t_n):

    𝓑_i = Σ_n w_n · (1/t_n) Σ_{k masked at t_n} log π_θ(o_i^k | x_{t_n})

The importance ratio and the advantage are per sequence, and each sequence's clipped term is divided by its length:

    r_i = exp(𝓑_i − 𝓑_old,i),   A_i = R_i − mean_g(R)
    loss = (1/B) Σ_i (1/|o_i|) · −min(r_i A_i, clip(r_i, 1 − ε, 1 + ε) A_i)

(𝓑 and 𝓑_old on the same masks). |o_i| and the scored tokens stop at the first EOS, inclusive (d1's completion
mask; positions after it are fed masked).

Followed: the paper (arXiv 2510.08554, its objective as stated on the project page gdpo.github.io); no official
code was reachable, so this follows the paper. Read as: the ratio of the ELBO likelihood surrogates is
exp(𝓑 − 𝓑_old) (the page writes 𝓛_ELBO / 𝓛_ELBO^old), the advantage is the un-normalised r − mean (the page's
std-normalised variant is commented out). Not implemented: the objective's KL term (its estimator is not given in
the material reachable here; no reference model is kept). Defaults where the reachable material is silent are
d1's (GDPO compares against diffu-GRPO on d1's benchmarks and setup): ε = 0.5, μ = 12; 3 quadrature nodes
(``estimator_kwargs.points``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Clip, GroupAdvantages, Likelihood, ResponseMask
from dare_gym.core.losses import importance_ratio


@dataclass
class GDPOConfig(ResponseMask, Likelihood, GroupAdvantages, Clip, AlgorithmConfig):
    num_iterations: int = 12
    epsilon: float = 0.5
    scale_rewards: str = "none"
    estimator: str = "quadrature"
    """likelihood estimator (quadrature: GDPO's Gauss–Legendre nodes in t, one random mask each; points 3)"""
    estimator_kwargs: dict = field(default_factory=lambda: {"points": 3})
    response_mask: str = "through_eos"


def gdpo_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, advantages: torch.Tensor, length: torch.Tensor, *,
              epsilon: float, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """GDPO's sequence objective as a loss: mean over sequences of −min(rA, clip(r, 1 ± ε)A) / |o|, with
    r = exp(𝓑 − 𝓑_old)."""
    ratio = importance_ratio(elbo - old_elbo, log_ratio_clamp)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    return (-surrogate / length.to(elbo.dtype)).mean()


@register_algorithm("gdpo", GDPOConfig)
class GDPO(PolicyGradient):
    """Group advantages and π_old on each iteration's masks (the skeleton's ``prepare``); the loss above."""

    @property
    def needs_reference(self) -> bool:
        return False  # the KL term is not implemented (see the module docstring)

    def loss(self, policy, batch, iteration):
        inputs, scores, old_logp, _ = self.score(policy, batch, iteration)
        valid = inputs.completion_mask.bool()  # through the first EOS
        scored = scores.scored & valid
        elbo = (scores.logp * scored).sum(dim=1)
        old_elbo = (old_logp * scored).sum(dim=1)  # same masks: the same terms
        rows = batch.active_rows().to(elbo.device)
        if not rows.any():  # every row discarded (a distributed run's padding): nothing to score
            return (elbo * 0).sum(), {}
        length = valid.sum(dim=1).clamp(min=1)
        loss = gdpo_loss(elbo[rows], old_elbo[rows], batch.advantage.to(elbo.device)[rows], length[rows],
                         epsilon=self.config.epsilon, log_ratio_clamp=self.config.log_ratio_clamp)
        ratio = (elbo - old_elbo).detach().exp()
        return loss, {"elbo": float(elbo.detach().mean()), "sequence_ratio": float(ratio.mean()),
                      "clip_fraction": float(((ratio - 1).abs() > self.config.epsilon).float().mean()),
                      "scored_tokens": float(scored.sum())}
