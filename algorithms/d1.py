"""diffu-GRPO (d1; Zhao et al., 2025): GRPO for masked diffusion LMs.

Per batch of G completions per prompt:
  1. advantages: r − mean(r) within each group (d1 does not divide by the std); groups where every
     completion scored the same carry no signal and are dropped;
  2. for each of μ inner iterations, draw fresh estimator noise (d1: a random prompt mask) and score the
     completions under the rollout policy (π_old) and the frozen reference on that same noise;
  3. each iteration minimises the token-level clipped surrogate plus β·KL(π_θ‖π_ref) (k3), averaged over
     the scored tokens of the batch (``loss_type="bnpo"``).

The likelihood estimator is pluggable: ``estimator: d1`` is the paper's one-step estimate with a masked
prompt; ``estimator: random_ratio`` is UniGRPO's partially masked completion (the embedded default's choice).
Defaults are d1's ``train.yaml`` (ε = 0.5, β = 0.04, μ = 12, p_mask_prompt = 0.15).
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import PolicyGradient, PolicyGradientConfig, register_algorithm


@dataclass
class DiffuGRPOConfig(PolicyGradientConfig):
    num_iterations: int = 12
    beta: float = 0.04
    epsilon: float = 0.5
    scale_rewards: str = "none"
    estimator: str = "d1"
    """likelihood estimator (d1's one-step estimator masks the prompt with p_mask_prompt, default 0.15)"""


@register_algorithm("d1", DiffuGRPOConfig)
class DiffuGRPO(PolicyGradient):
    """The skeleton's token-level clipped surrogate with d1's one-step estimator, as the paper has it."""
