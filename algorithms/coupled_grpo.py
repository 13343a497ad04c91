"""coupled-GRPO (DiffuCoder; Gong et al., 2025): GRPO whose likelihood comes from complementary masks.

Followed: the official code (apple/ml-diffucoder ``src/open_r1/coupled_grpo.py``, ``recipes/
config_coupled_code.yaml``). Each inner iteration draws one t ~ U(0.2, 0.8) and scores every completion three
times: fully masked, with the tokens u_k < t masked, and with the complement masked, so that every token is
scored exactly once by the pair (the ``coupled`` estimator). Advantages are leave-one-out (RLOO) with no std
scaling; uniform groups stay in the batch with A = 0. The loss is d1's token-level clipped surrogate plus β·k3,
on the coupled estimates of π_θ, π_old and π_ref over identical masks, averaged over the tokens up to and
including the first end-of-turn token (DiffuCoder cuts at ``<|im_end|>``; here ``through_stop``: the first
stop token, EOS or end-of-turn). Defaults: ε = 0.5, β = 0.01, μ = 2 (lr 1e-6, G = 10, temperature 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import GRPOConfig, register_algorithm
from dare_gym.algorithms.d1 import DiffuGRPO


@dataclass
class CoupledGRPOConfig(GRPOConfig):
    num_iterations: int = 2
    beta: float = 0.01
    epsilon: float = 0.5
    baseline: str = "rloo"
    scale_rewards: str = "none"
    estimator: str = "coupled"
    response_mask: str = "through_stop"


@register_algorithm("coupled_grpo", CoupledGRPOConfig)
class CoupledGRPO(DiffuGRPO):
    """d1's loss over the coupled estimator with RLOO advantages (DiffuCoder builds on d1's trainer)."""
