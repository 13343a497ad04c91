"""GDPO (group diffusion policy optimisation; Rojas, Lin, Rasul, Schneider, Nevmyvaka, Tao & Deng, 2025): GRPO on a
sequence-level ELBO estimated by semi-deterministic Monte Carlo.

The ELBO of a completion is a double integral, over the noise level t and over the random mask at that level; the
paper finds most of its variance comes from t and takes that integral by a deterministic quadrature, leaving one
random mask per node (the ``quadrature`` estimator: Gauss–Legendre nodes t_n on [0, 1], ⌊t_n·L⌋ of the L completion
positions masked at node n, weight w_n/t_n):

    𝓑_i = Σ_n w_n · (1/t_n) Σ_{k masked at t_n} log π_θ(o_i^k | x_{t_n})

The importance ratio is per sequence and length-normalised by the completion width L (the padded generation
length, the same for every row), the advantage is the group-centred reward, and the loss averages sequences:

    r_i = exp((𝓑_i − 𝓑_old,i) / L),   A_i = R_i − mean_g(R)
    loss = (1/B) Σ_i [ −min(r_i A_i, clip(r_i, 1 − ε, 1 + ε) A_i) + β·(e^{d_i} − d_i − 1) ],  d_i = 𝓑_ref,i − 𝓑_i

Every completion position counts, the EOS padding after the answer included (``response_mask: all``).

Followed: the official code (KevinRojas1499/GDPO at 1918683, built on d1: ``gdpo/gdpo_trainer.py``'s
``compute_loss`` and advantages, ``gdpo/likelihood_estimators.py``'s ``NumericalIntegrationEstimator``,
``gdpo/slurm_scripts/countdown_base.sbatch``), which the paper describes. Its defaults: ε = 0.5, μ = 12, β = 0 (the
sequence-level KL on the ELBOs is off; a reference model is kept only for β > 0), 3 Gauss–Legendre nodes
(``estimator_kwargs.points``), A without std scaling. Two departures, both from NVIDIA NeMo RL's GDPO (written
with a co-author): 𝓑, 𝓑_old and 𝓑_ref are scored on the same masks (the official code draws π_old's masks at
generation and the current ones from another seed, so its ratio carries mask noise even on the first update), and
each node masks at least one position (the official ⌊t_n·L⌋ leaves a short completion's first node empty; at its
L = 256 the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, register_algorithm
from dare_gym.algorithms.options import Clip, GroupAdvantages, Likelihood, ResponseMask, is_number
from dare_gym.core.losses import importance_ratio


@dataclass
class GDPOConfig(ResponseMask, Likelihood, GroupAdvantages, Clip, AlgorithmConfig):
    num_iterations: int = 12
    epsilon: float = 0.5
    beta: float = 0.0
    """weight of the sequence-level k3 term on the ELBOs towards the frozen reference (official: 0, off)"""
    scale_rewards: str = "none"
    estimator: str = "quadrature"
    """likelihood estimator (quadrature: GDPO's Gauss–Legendre nodes in t, one random mask each; points 3)"""
    estimator_kwargs: dict = field(default_factory=lambda: {"points": 3})
    response_mask: str = "all"

    def check(self):
        if not (is_number(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")


def gdpo_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, advantages: torch.Tensor, width: int, *,
              epsilon: float, ref_elbo: torch.Tensor | None = None, beta: float = 0.0,
              log_ratio_clamp: float | None = None) -> torch.Tensor:
    """GDPO's sequence objective as a loss: the mean over sequences of −min(rA, clip(r, 1 ± ε)A) with
    r = exp((𝓑 − 𝓑_old)/width), plus β·k3 of the ELBOs towards the reference where β > 0."""
    ratio = importance_ratio((elbo - old_elbo) / width, log_ratio_clamp)
    per_sequence = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    if beta > 0:
        d = ref_elbo - elbo
        per_sequence = per_sequence + beta * (torch.exp(d) - d - 1)
    return per_sequence.mean()


@register_algorithm("gdpo", GDPOConfig)
class GDPO(PolicyGradient):
    """Group advantages, π_old and (for β > 0) π_ref on each iteration's masks (the skeleton's ``prepare``); the
    loss above."""

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        scored = scores.scored & inputs.completion_mask.bool()
        elbo = (scores.logp * scored).sum(dim=1)
        old_elbo = (old_logp * scored).sum(dim=1)  # same masks: the same terms
        ref_elbo = (ref_logp * scored).sum(dim=1) if ref_logp is not None else None
        rows = batch.active_rows().to(elbo.device)
        if not rows.any():  # every row discarded (a distributed run's padding): nothing to score
            return (elbo * 0).sum(), {}
        width = inputs.completion_ids.shape[1]  # the official max_completion_length: every row's generation width
        loss = gdpo_loss(elbo[rows], old_elbo[rows], batch.advantage.to(elbo.device)[rows], width,
                         epsilon=config.epsilon, ref_elbo=None if ref_elbo is None else ref_elbo[rows],
                         beta=config.beta, log_ratio_clamp=config.log_ratio_clamp)
        ratio = ((elbo - old_elbo).detach() / width).exp()
        metrics = {"elbo": float(elbo.detach().mean()), "sequence_ratio": float(ratio.mean()),
                   "clip_fraction": float(((ratio - 1).abs() > config.epsilon).float().mean()),
                   "scored_tokens": float(scored.sum())}
        if ref_elbo is not None:
            metrics["elbo_ref_gap"] = float((ref_elbo - elbo).detach().mean())
        return loss, metrics
