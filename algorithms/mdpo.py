"""MDPO (masked diffusion policy optimisation; He et al., 2025): rewards for the intermediate denoising steps.

During the rollout the sampler records, at every step t, its full guess x̂₀ (masked positions filled with
that step's predictions) and its confidences; the env's reward of each guess gives R_t. The step advantage
("adv-v4") rewards progress and future quality, â_t = (R_t − R_{t−1}) + 1 + mean(R_{t+1..T−1}) with
R_{−1} = 0 (the official code's first term is R_0 + 1), z-scored per step across the group. Training uses the
K steps with the largest Σ_batch |A_t|: at step t the input is the state x_t, the targets are x̂₀, and each
masked token's clipped surrogate is weighted by λ_t·conf with λ_t = L/(#masked + 1e-4); summed and divided by
the batch's masked count, then averaged over the K steps. Every position still masked at step t counts, EOS
padding included (``response_mask: all``), and groups whose step rewards are all equal stay in the batch.

Temperature, as the official code has it: the sampler draws x̂₀ from softmax(logits / T), commits the most
probable guesses under that same tempered distribution and records it as ``conf`` (the rollout asks for
``tempered_confidence``); training scores log f(x̂₀ | x_t) from logits divided by the rollout's T
(``_get_per_token_logps``), so π_old and π_θ are the tempered policy that drew the rollout. (DARE's MDPO divides
neither.) Followed: the official code (autonomousvision/mdpo ``src/open_r1/mdpo/mdpo_trainer.py``,
``src/mdlm_generation_utils.py``, ``recipes/LLaDA-Instruct/mdpo/config_demo.yaml``).
Defaults (LLaDA recipe): ε = 0.2, μ = 1, K = 16, no KL (lr 1e-5, G = 4, rollout temperature 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dare_gym.core.advantages import mdpo_step_advantages
from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, Rollout, register_algorithm
from dare_gym.algorithms.options import Clip, ResponseMask
from dare_gym.core.logprobs import token_log_probs
from dare_gym.core.losses import mdpo_step_loss


@dataclass
class MDPOConfig(ResponseMask, Clip, AlgorithmConfig):
    epsilon: float = 0.2
    """ratio clip range of each step's surrogate"""
    train_steps: int = 16
    """K: denoising steps trained per batch (those with the largest total |advantage|)"""
    response_mask: str = "all"

    def check(self):
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 1:
            raise ValueError(f"train_steps must be an integer >= 1, got {self.train_steps!r}")


ROLLOUT_TEMPERATURE = "mdpo.temperature"  # buffer column: the temperature each rollout was drawn at


@dataclass
class TemperedRollout(Rollout):
    """The default rollout, remembering the sampler's temperature for the training log-probs."""

    temperature: float = 0.0

    def buffer(self, rewards, group_ids, correct=None):
        buffer = super().buffer(rewards, group_ids, correct)
        buffer.columns[ROLLOUT_TEMPERATURE] = torch.full((len(buffer),), self.temperature)
        return buffer


def tempered(logits: torch.Tensor, batch) -> torch.Tensor:
    """logits / T with the rollout's temperature T (unchanged at T = 0, a greedy rollout)."""
    temperature = float(batch.columns[ROLLOUT_TEMPERATURE][0]) if ROLLOUT_TEMPERATURE in batch.columns else 0.0
    return logits / temperature if temperature > 0 else logits


@register_algorithm("mdpo", MDPOConfig)
class MDPO(Algorithm):
    rollout_needs = ("step_predictions",)
    rollout_settings = {"tempered_confidence": True}  # conf = p(x̂₀) under softmax(logits / T), the official weight
    minibatch_unit = "group_id"  # step advantages are z-scores within a group

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator, batch_size: int,
                settings: dict[str, Any]) -> Rollout:
        rollout = super().rollout(policy, prompts, group_size=group_size, generator=generator,
                                  batch_size=batch_size, settings=settings)
        options = dict(settings)
        _, resolved = policy.sampler_settings(options.pop("sampler", None), options)
        return TemperedRollout(rollout.prompts, rollout.completions, policy, rollout.response_mask,
                               temperature=float(resolved.temperature))

    def advantages(self, buffer, group_size):
        buffer.columns["step_advantage"] = mdpo_step_advantages(buffer.columns["step_reward"], group_size)
        return buffer

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
            values.append(token_log_probs(tempered(logits, batch), targets))
        return torch.stack(values, dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        logps = self._step_logps(policy, batch)
        steps = batch.columns["train_steps"][0].tolist()
        losses = []
        for k, t in enumerate(steps):
            # the positions still masked at step t (response_mask all: EOS padding included, as the official loss)
            masked = (inputs.unmask_step >= t) & inputs.completion_mask.bool()
            losses.append(mdpo_step_loss(
                logps[:, k], batch.columns["old_step_logp"][:, k].to(logps.device),
                batch.columns["step_advantage"][:, t].to(logps.device), masked,
                batch.columns["step_confidence"][:, t].to(logps.device), self.config.epsilon,
                log_ratio_clamp=self.config.log_ratio_clamp,
            ))
        return torch.stack(losses).mean(), {"train_steps": float(len(steps))}

