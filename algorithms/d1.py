"""diffu-GRPO (d1; Zhao et al., 2025): GRPO for masked diffusion LMs.

Per batch of G completions per prompt:
  1. advantages: r − mean(r) within each group (d1 does not divide by the std; ``scale_rewards`` can);
     groups where every completion scored the same carry no signal and are dropped;
  2. for each of μ inner iterations, draw fresh estimator noise (d1: a random prompt mask) and score the
     completions under the rollout policy (π_old) and the frozen reference on that same noise;
  3. each iteration minimises the token-level clipped surrogate plus β·KL(π_θ‖π_ref) (k3), averaged over
     the scored tokens of the batch (``loss_type="bnpo"``).

The likelihood estimator is pluggable: ``estimator: d1`` is the paper's one-step estimate with a masked
prompt; ``estimator: random_ratio`` is UniGRPO's partially masked completion.
Defaults are d1's ``train.yaml`` (ε = 0.5, β = 0.04, μ = 12, p_mask_prompt = 0.15).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dare_gym.advantages import SCALE_CHOICES, group_advantages, zero_variance_groups
from dare_gym.algorithms.base import AlgorithmConfig, register_algorithm
from dare_gym.buffer import RolloutBuffer
from dare_gym.estimators import make_estimator
from dare_gym.losses import KL_ESTIMATORS, LOSS_TYPES, aggregate, clipped_surrogate, kl_penalty

NOISE_PREFIX = "noise."


@dataclass
class DiffuGRPOConfig(AlgorithmConfig):
    num_iterations: int = 12
    beta: float = 0.04
    epsilon: float = 0.5
    epsilon_high: float | None = None  # clip-higher (DAPO); None: same as epsilon
    kl_estimator: str = "k3"
    loss_type: str = "bnpo"
    scale_rewards: str = "none"
    drop_zero_variance_groups: bool = True
    estimator: str = "d1"
    estimator_kwargs: dict = field(default_factory=lambda: {"p_mask_prompt": 0.15})

    def __post_init__(self):
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon!r} / epsilon_high {self.epsilon_high!r}")
        for name, value, choices in (
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, SCALE_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@register_algorithm("d1", DiffuGRPOConfig)
class DiffuGRPO:
    def __init__(self, config: DiffuGRPOConfig, *, mask_token_id: int):
        self.config = config
        try:
            self.estimator = make_estimator(config.estimator, mask_token_id=mask_token_id, **config.estimator_kwargs)
        except TypeError as error:
            raise ValueError(f"estimator_kwargs {config.estimator_kwargs!r} do not fit {config.estimator!r}: {error}") from None

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0

    # 1. advantages -----------------------------------------------------------------------------------
    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        buffer.advantage = group_advantages(buffer.reward, group_size, scale_rewards=self.config.scale_rewards)
        if self.config.drop_zero_variance_groups:
            flat = zero_variance_groups(buffer.reward, group_size).repeat_interleave(group_size)
            buffer = buffer.select(~flat)
        return buffer

    # 2. score π_old and π_ref on each iteration's noise ----------------------------------------------------
    @torch.no_grad()
    def prepare(self, policy, reference, buffer: RolloutBuffer, generator, micro_batch_size: int = 64) -> None:
        iterations = self.config.num_iterations
        inputs = buffer.model_inputs(policy.device)
        noises = [self.estimator.sample_noise(inputs, generator) for _ in range(iterations)]
        for name in noises[0]:
            buffer.columns[NOISE_PREFIX + name] = torch.stack([n[name] for n in noises], dim=1).cpu()
        scorers = []
        if iterations > 1:  # with μ = 1 the update is on-policy and π_old is π_θ detached
            scorers.append(("old_logp", policy))
        if self.needs_reference:
            scorers.append(("ref_logp", reference))
        chunks = [torch.arange(start, min(start + micro_batch_size, len(buffer)))
                  for start in range(0, len(buffer), micro_batch_size)]
        chunk_inputs = [buffer.select(rows).model_inputs(policy.device) for rows in chunks]
        for column, scorer in scorers:
            per_iteration = []
            for noise in noises:
                scores = [
                    self.estimator.token_logp(scorer.logits, inputs, {k: v[rows] for k, v in noise.items()}).logp
                    for rows, inputs in zip(chunks, chunk_inputs)
                ]
                per_iteration.append(torch.cat(scores).cpu())
            buffer.columns[column] = torch.stack(per_iteration, dim=1)

    # 3. the clipped surrogate with a KL penalty ---------------------------------------------------------
    def loss(self, policy, batch: RolloutBuffer, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        inputs = batch.model_inputs(policy.device)
        noise = {
            name[len(NOISE_PREFIX) :]: value[:, iteration].to(policy.device)
            for name, value in batch.columns.items()
            if name.startswith(NOISE_PREFIX)
        }
        scores = self.estimator.token_logp(policy.logits, inputs, noise)
        logp = scores.logp
        old_logp = batch.columns["old_logp"][:, iteration].to(logp.device) if "old_logp" in batch.columns else logp.detach()
        advantages = batch.advantage.to(logp.device)[:, None]
        per_token, clip_active = clipped_surrogate(
            logp, old_logp, advantages, epsilon_low=config.epsilon, epsilon_high=config.epsilon_high
        )
        mask = inputs.completion_mask.bool() & scores.scored
        metrics: dict[str, float] = {}
        if config.beta > 0:
            kl = kl_penalty(logp, batch.columns["ref_logp"][:, iteration].to(logp.device), config.kl_estimator)
            per_token = per_token + config.beta * kl
            metrics["kl_ref"] = _masked_mean(kl.detach(), mask)
        loss = aggregate(per_token, mask, config.loss_type, max_completion_length=logp.shape[1])
        log_ratio = (logp - old_logp).detach()
        metrics["approx_kl_old"] = _masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)
        metrics["clip_fraction"] = _masked_mean(clip_active, mask)
        metrics["entropy"] = _masked_mean(scores.entropy, mask)
        metrics["scored_tokens"] = float(mask.sum())
        return loss, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0
