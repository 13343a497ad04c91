"""diffu-GRPO (d1; Zhao et al., 2025): GRPO for masked diffusion LMs.

Followed: the official d1 code (``diffu-grpo/diffu_grpo_trainer.py`` and ``slurm_scripts/train.yaml``), which
agrees with the paper. Per batch of G completions per prompt:

  1. advantages: A = r − mean(r) within each group (no division by the std). Groups whose completions all
     scored the same keep A = 0 and stay in the batch: their tokens count in the loss's normaliser, as in
     d1 (and TRL, which it builds on);
  2. for each of μ inner iterations, draw fresh estimator noise (d1: each real prompt token masked with
     p = 0.15, the completion fully masked) and score the completions under the rollout policy (π_old) and the
     frozen reference on that same noise;
  3. each iteration minimises the token-level clipped surrogate plus β·k3(π_θ‖π_ref) over the completion
     tokens up to and including the first EOS, averaged over the scored tokens of the micro-batch
     (``loss_type="bnpo"``):

         loss = Σ_{i,k} m_ik [ −min(ρ_ik A_i, clip(ρ_ik, 1 − ε, 1 + ε) A_i) + β·k3_ik ] / Σ_{i,k} m_ik

Defaults are d1's: ε = 0.5, β = 0.04, μ = 12, p_mask_prompt = 0.15 (its lr is 3e-6, G = 6, rollout temperature
0.9; those are run settings, not algorithm fields). On a block-causal model the noised completion is scored
with the family's noisy/clean forward (each noised block sees the clean blocks before it), where the official
code has no block-causal path.

The preset ``digitsort`` is the embedded default's recipe (``dare-gym train`` with no arguments): UniGRPO's
random-ratio estimator, std-normalised advantages, clip 0.2, μ = 2, zero-variance groups dropped — what learns
fastest on the tiny model (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from dare_gym.algorithms.base import GRPOConfig, PolicyGradient, register_algorithm


@dataclass
class DiffuGRPOConfig(GRPOConfig):
    num_iterations: int = 12
    epsilon: float = 0.5
    beta: float = 0.04
    scale_rewards: str = "none"
    estimator: str = "d1"
    """likelihood estimator (d1's one-step estimator masks the prompt with p_mask_prompt, default 0.15)"""
    response_mask: str = "through_eos"


PRESETS = {
    "digitsort": dict(estimator="random_ratio", estimator_kwargs={"t_min": 0.1}, num_iterations=2, epsilon=0.2,
                      beta=0.04, scale_rewards="group", drop_zero_variance_groups=True),
}


@register_algorithm("d1", DiffuGRPOConfig, presets=PRESETS)
class DiffuGRPO(PolicyGradient):
    """Steps 1–2 are the shared pieces (``advantages``: group advantages; ``prepare``: π_old and π_ref scored on
    each iteration's noise); the loss of step 3 is written out here."""

    def loss(self, policy, batch, iteration):
        # this iteration's estimate of log π_θ on its noise, with π_old's and π_ref's on the very same noise
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        mask = inputs.completion_mask.bool() & scores.scored  # the response tokens the estimator scored
        advantages = batch.advantage.to(scores.logp.device)
        # per token: −min(ρA, clip(ρ, 1 − ε, 1 + ε)A) + β·k3(π_θ‖π_ref), with ρ = exp(log π_θ − log π_old)
        per_token, metrics = self.token_loss(scores, old_logp, ref_logp, advantages, mask)
        per_token = self.correct_for_rollout(per_token, old_logp, batch, mask, metrics)  # off unless asked
        return self.aggregate(per_token, mask, batch), metrics  # bnpo: Σ m·ℓ / Σ m over the micro-batch
