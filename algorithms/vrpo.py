"""VRPO (variance-reduced preference optimisation; LLaDA 1.5, Zhu et al., 2025): DPO whose ELBO estimates
are made low-variance at no extra cost.

Three changes to DPO's estimator, none to its loss (see ``dpo.py``):
  1. a larger budget per ELBO, n = 8 samples;
  2. the optimal allocation: one mask per sampled t (n_t = n, n_mask = 1) — the ``elbo`` estimator's
     stratified counts draw one mask per count;
  3. antithetic sampling: the same t's and masks for 𝓑_θ(y) and 𝓑_ref(y), so their shared noise cancels in
     each difference — built in, since the reference is scored on the policy's noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_gym.algorithms.base import register_algorithm
from dare_gym.algorithms.dpo import DPO, DPOConfig


@dataclass
class VRPOConfig(DPOConfig):
    estimator_kwargs: dict = field(default_factory=lambda: {"mc_num": 8})


@register_algorithm("vrpo", VRPOConfig)
class VRPO(DPO):
    """DPO with VRPO's eight-sample, one-mask-per-t, antithetic ELBO."""
