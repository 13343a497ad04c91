"""MDPO (masked diffusion policy optimisation; He et al., 2025): rewards for the intermediate denoising steps.

During the rollout the sampler records, at every step t, its full guess x̂₀ (masked positions filled with
that step's predictions) and its confidences; the env's reward of each guess gives R_t. The step advantage
("adv-v4") rewards progress and future quality, â_t = (R_t − R_{t−1}) + 1 + mean(R_{t+1..T−1}) with
R_{−1} = 0 (the official code's first term is R_0 + 1), z-scored per step across the group. Training uses the
K steps with the largest Σ_batch |A_t|: at step t the input is the state x_t, the targets are x̂₀, and each
masked token's clipped surrogate is weighted by λ_t·conf with λ_t = L/(#masked + 1e-4); summed and divided by
the batch's masked count, then averaged over the K steps. ``conf`` is the guess's probability under the
rollout's tempered distribution softmax(logits / T), as the official sampler records it (it samples x̂₀ from
that distribution); the rollout asks the sampler for it (``tempered_confidence``), while the sampler's own
remasking rule keeps LLaDA's untempered confidence.
Defaults (LLaDA recipe): ε = 0.2, β = 0, μ = 1, K = 16, lr 1e-5, G = 4, rollout temperature 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, check_clamps, register_algorithm

from dare_gym.advantages import mdpo_step_advantages
from dare_gym.distributed import active_rows, discard_rows
from dare_gym.logprobs import token_log_probs
from dare_gym.losses import mdpo_step_loss


@dataclass
class MDPOConfig(AlgorithmConfig):
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    """ratio clip range of each step's surrogate"""
    train_steps: int = 16
    """K: denoising steps trained per batch (those with the largest total |advantage|)"""
    log_ratio_clamp: float | None = None
    """clamp log(π_θ/π_old) to [-c, c] before exponentiating it (verl uses 20); null: no clamp"""

    def __post_init__(self):
        if self.beta != 0:
            raise ValueError(f"this MDPO has no KL term (the recipe's β = 0): beta must be 0, got {self.beta!r}")
        if self.train_steps < 1 or self.num_iterations < 1:
            raise ValueError(f"train_steps and num_iterations must be >= 1, got {self.train_steps!r}, {self.num_iterations!r}")
        check_clamps(self, ("log_ratio_clamp",))


@register_algorithm("mdpo", MDPOConfig)
class MDPO(Algorithm):
    rollout_needs = ("step_predictions",)
    rollout_settings = {"tempered_confidence": True}  # conf = p(x̂₀) under softmax(logits / T), the official weight
    minibatch_unit = "group_id"  # step advantages are z-scores within a group

    def advantages(self, buffer, group_size):
        step_rewards = buffer.columns["step_reward"]
        buffer.columns["step_advantage"] = mdpo_step_advantages(step_rewards, group_size)
        informative = (step_rewards.view(-1, group_size, step_rewards.shape[1]).std(dim=1) > 0).any(dim=1)
        return discard_rows(buffer, ~informative.repeat_interleave(group_size))

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        """Pick the K steps with the largest total |A_t|; π_old is π_θ (on-policy, μ = 1 by default)."""
        weight = buffer.columns["step_advantage"].abs().sum(dim=0)
        chosen = torch.argsort(weight, descending=True)[: self.config.train_steps]
        buffer.columns["train_steps"] = chosen.expand(len(buffer), -1).clone()
        with torch.no_grad():
            buffer.columns["old_step_logp"] = self._step_logps(policy, buffer)

    def _step_logps(self, policy, batch) -> torch.Tensor:
        """[B, K, L] log f(x̂₀ | x_t) at each chosen step t (x_t: the tokens committed before t revealed)."""
        inputs = batch.model_inputs(policy.device)
        values = []
        for t in batch.columns["train_steps"][0].tolist():
            state = inputs.completion_ids.masked_fill(inputs.unmask_step >= t, self.mask_token_id)
            logits = policy.logits(torch.cat([inputs.prompt_ids, state], dim=1), inputs.attention_mask,
                                   logits_to_keep=state.shape[1])
            targets = batch.columns["step_prediction"][:, t].to(policy.device)
            values.append(token_log_probs(logits, targets))
        return torch.stack(values, dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        logps = self._step_logps(policy, batch)
        steps = batch.columns["train_steps"][0].tolist()
        losses = []
        for k, t in enumerate(steps):
            masked = (inputs.unmask_step >= t) & inputs.attention_mask[:, inputs.prompt_length:].bool() & \
                active_rows(inputs)[:, None]  # discarded rows (distributed runs) train nothing
            losses.append(mdpo_step_loss(
                logps[:, k], batch.columns["old_step_logp"][:, k].to(logps.device),
                batch.columns["step_advantage"][:, t].to(logps.device), masked,
                batch.columns["step_confidence"][:, t].to(logps.device), self.config.epsilon,
                log_ratio_clamp=self.config.log_ratio_clamp,
            ))
        return torch.stack(losses).mean(), {"train_steps": float(len(steps))}

