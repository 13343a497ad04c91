"""coupled-GRPO (DiffuCoder; Gong et al., 2025): GRPO whose likelihood comes from complementary masks.

Each inner iteration draws one t ~ U(0.2, 0.8) and scores every completion three times: fully masked, with
the tokens u_k < t masked, and with the complement masked, so that every token is scored exactly once by
the pair (the ``coupled`` estimator, weights 1/t and 1/(1−t)). Advantages are leave-one-out (RLOO) with no
std scaling; the loss is d1's token-level clipped surrogate plus β·k3, on the coupled estimates of π_θ,
π_old and π_ref over identical masks. Defaults: ``config_coupled_code.yaml`` (ε = 0.5, β = 0.01, μ = 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import PolicyGradient, PolicyGradientConfig, register_algorithm


@dataclass
class CoupledGRPOConfig(PolicyGradientConfig):
    num_iterations: int = 2
    beta: float = 0.01
    epsilon: float = 0.5
    baseline: str = "rloo"
    scale_rewards: str = "none"
    estimator: str = "coupled"


@register_algorithm("coupled_grpo", CoupledGRPOConfig)
class CoupledGRPO(PolicyGradient):
    """The shared clipped surrogate over the coupled estimator with RLOO advantages."""
