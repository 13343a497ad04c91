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

from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, Rollout, RolloutContext, register_algorithm
from dare_gym.algorithms.options import Clip, ResponseMask
from dare_gym.core.advantages import STD_EPS
from dare_gym.core.logprobs import token_log_probs
from dare_gym.core.losses import clipped_surrogate


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


# Buffer columns this algorithm writes and reads.
ROLLOUT_TEMPERATURE = "mdpo.temperature"  # [N] the temperature each rollout was drawn at
STEP_REWARD = "step_reward"  # [N, T] the env's reward of the sampler's guess x̂₀ at every step
STEP_PREDICTION = "step_prediction"  # [N, T, L] that guess
STEP_CONFIDENCE = "step_confidence"  # [N, T, L] its probability under the rollout's tempered distribution
STEP_ADVANTAGE = "step_advantage"  # [N, T]
TRAIN_STEPS = "mdpo.train_steps"  # [N, K] the K steps trained (the same on every row)
OLD_STEP_LOGP = "mdpo.old_step_logp"  # [N, K, L] π_old's log f(x̂₀ | x_t) at those steps


@dataclass
class StepRewardRollout(Rollout):
    """The default rollout plus, per completion, every step's guess scored by the env, and the temperature the
    rollout was drawn at (for the training log-probs)."""

    temperature: float = 0.0
    context: RolloutContext | None = None

    def buffer(self, rewards, group_ids, correct=None):
        buffer = super().buffer(rewards, group_ids, correct)
        buffer.columns[ROLLOUT_TEMPERATURE] = torch.full((len(buffer),), self.temperature)
        step_rewards = [self.context.score_texts(index, [self.policy.decode(guess) for guess in c.step_predictions])
                        for c, index in zip(self.completions, self.context.indices)]
        buffer.columns[STEP_REWARD] = torch.tensor(step_rewards, dtype=torch.float32)
        buffer.columns[STEP_PREDICTION] = torch.stack([c.step_predictions for c in self.completions])
        buffer.columns[STEP_CONFIDENCE] = torch.stack([c.step_confidence for c in self.completions])
        return buffer


def tempered(logits: torch.Tensor, batch) -> torch.Tensor:
    """logits / T with the rollout's temperature T (unchanged at T = 0, a greedy rollout)."""
    temperature = float(batch.columns[ROLLOUT_TEMPERATURE][0]) if ROLLOUT_TEMPERATURE in batch.columns else 0.0
    return logits / temperature if temperature > 0 else logits


def mdpo_step_advantages(step_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """MDPO's step advantages ("adv-v4"): per step t of each rollout, â_t = (R_t − R_{t−1}) + 1 +
    mean(R_{t+1..T−1}) with R_{−1} := 0 (the official code's first difference is R_0 itself) and the last
    step's tail term R_{T−1}; then a z-score per step across each group (the +1 cancels). ``step_rewards`` is
    [N, T]; returns [N, T]."""
    rewards = step_rewards.double()
    previous = torch.cat([torch.zeros_like(rewards[:, :1]), rewards[:, :-1]], dim=1)
    steps = rewards.shape[1]
    tails = torch.stack(
        [rewards[:, t + 1 :].mean(dim=1) if t + 1 < steps else rewards[:, -1] for t in range(steps)], dim=1
    )
    raw = (rewards - previous) + 1 + tails
    grouped = raw.view(-1, group_size, steps)
    normalised = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    return normalised.view_as(raw).to(step_rewards.dtype)


def mdpo_step_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, masked: torch.Tensor,
                   confidence: torch.Tensor, epsilon: float, *, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """MDPO's loss at one denoising step: per token −s·λ_t·conf with λ_t = L/(#masked + 1e-4), on the positions
    masked in that step's state, summed and divided by the batch's masked count. ``conf`` is the rollout's
    probability of each guess under its tempered distribution softmax(logits / T), as the official sampler
    records it."""
    weights = masked.to(logp.dtype)
    lam = masked.shape[1] / (weights.sum(dim=1) + 1e-4)
    per_token, _ = clipped_surrogate(logp, old_logp, advantages[:, None], epsilon_low=epsilon,
                                     log_ratio_clamp=log_ratio_clamp)
    return (per_token * lam[:, None] * confidence * weights).sum() / weights.sum().clamp(min=1)



@register_algorithm("mdpo", MDPOConfig)
class MDPO(Algorithm):
    rollout_settings = {"tempered_confidence": True}  # conf = p(x̂₀) under softmax(logits / T), the official weight
    minibatch_unit = "group_id"  # step advantages are z-scores within a group

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator, batch_size: int,
                settings: dict[str, Any], context: RolloutContext | None = None) -> Rollout:
        """The sampler's guess x̂₀ and its confidences recorded at every step, for the env to score."""
        if context is None:
            raise ValueError("mdpo's rollout needs the env's scoring of the intermediate guesses (a RolloutContext)")
        completions = policy.generate(list(prompts), generator=generator, batch_size=batch_size,
                                      record_predictions=True, **settings)
        options = dict(settings)
        _, resolved = policy.sampler_settings(options.pop("sampler", None), options)
        return StepRewardRollout(list(prompts), completions, policy, self.response_mask,
                                 temperature=float(resolved.temperature), context=context)

    def advantages(self, buffer, group_size):
        buffer.columns[STEP_ADVANTAGE] = mdpo_step_advantages(buffer.columns[STEP_REWARD], group_size)
        return buffer

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        """Pick the K steps with the largest total |A_t|; π_old is π_θ (on-policy, μ = 1 by default)."""
        weight = buffer.columns[STEP_ADVANTAGE].abs().sum(dim=0)
        chosen = torch.argsort(weight, descending=True)[: self.config.train_steps]
        buffer.columns[TRAIN_STEPS] = chosen.expand(len(buffer), -1).clone()
        with torch.no_grad():
            buffer.columns[OLD_STEP_LOGP] = self._step_logps(policy, buffer)

    def _step_logps(self, policy, batch) -> torch.Tensor:
        """[B, K, L] log f(x̂₀ | x_t) at each chosen step t (x_t: the tokens committed before t revealed)."""
        inputs = batch.model_inputs(policy.device)
        values = []
        for t in batch.columns[TRAIN_STEPS][0].tolist():
            state = inputs.completion_ids.masked_fill(inputs.unmask_step >= t, self.mask_token_id)
            logits = policy.logits(torch.cat([inputs.prompt_ids, state], dim=1), inputs.attention_mask,
                                   logits_to_keep=state.shape[1])
            targets = batch.columns[STEP_PREDICTION][:, t].to(policy.device)
            values.append(token_log_probs(tempered(logits, batch), targets))
        return torch.stack(values, dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        logps = self._step_logps(policy, batch)
        steps = batch.columns[TRAIN_STEPS][0].tolist()
        losses = []
        for k, t in enumerate(steps):
            # the positions still masked at step t (response_mask all: EOS padding included, as the official loss)
            masked = (inputs.unmask_step >= t) & inputs.completion_mask.bool()
            losses.append(mdpo_step_loss(
                logps[:, k], batch.columns[OLD_STEP_LOGP][:, k].to(logps.device),
                batch.columns[STEP_ADVANTAGE][:, t].to(logps.device), masked,
                batch.columns[STEP_CONFIDENCE][:, t].to(logps.device), self.config.epsilon,
                log_ratio_clamp=self.config.log_ratio_clamp,
            ))
        return torch.stack(losses).mean(), {"train_steps": float(len(steps))}

