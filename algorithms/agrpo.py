"""AGRPO (amortized group relative policy optimisation; Zhan, 2025): an unbiased Monte-Carlo policy gradient over
the rollout's own denoising steps.

A masked-diffusion rollout is a Markov chain: step t turns the state x_t into x_{t+1} by committing some tokens,
and log π(o) = Σ_t log π(tokens committed at t | x_t) exactly. GRPO on that sum needs one forward per step (CJ-GRPO
replays them all); AGRPO estimates it by sampling steps. Per completion, ``mc_samples`` steps are drawn uniformly
from 0..T_i (T_i: the last step that committed a non-EOS token; later steps only pad) with a low-discrepancy
sampler, u_ij = (perm(i·M + j) + U)/(B·M); the forward on the state before step s_ij scores the tokens that step
committed, from the logits divided by the rollout temperature (the sampled policy), and each goes through PPO's
clip:

    ρ_k = π_θ(o^k | x_s) / π_old(o^k | x_s),   ℓ_k = −min(ρ_k A_i, clip(ρ_k, 1 − ε, 1 + ε_high) A_i) + β·ρ_k·k3_k
    loss = (1/B) Σ_i (1/M) Σ_j Σ_{k committed at s_ij} ℓ_k

A = r − mean(r) (no std), uniform groups kept with A = 0. The KL (off by default, β = 0) is k3 towards the
reference weighted by ρ (the DeepSeek-V3.2 correction the official code applies). Each Monte-Carlo step is
backpropagated on its own (one graph at a time), as the official trainer does.

Followed: the official code (github probablyabot/agrpo at 98f1182, ``agrpo_trainer.py`` ``compute_loss``,
``agrpo_config.py``, ``train.yaml``) and the paper (arXiv 2510.04019). Defaults: ``train.yaml``'s recipe, M = 24,
low-discrepancy steps, ε = 0.2, β = 0, μ = 1 (π_old is the rollout policy; lr 5e-6, G = 8, temperature 0.6).
Deviations: (1) steps are drawn uniformly; ``train.yaml``'s entropy-proportional step sampling (with its importance
weights) needs the sampler's per-token entropies, which this project's samplers do not record. (2) π_old is scored
by a forward on the same states (with μ = 1, π_θ detached), where the official code reuses the sampler's
log-probs, which also carry its top-k/top-p truncation; the rollouts here are not truncated by default, so the two
agree up to floating point. (3) The official sampler commits the same number of tokens at every step; here a step
may commit any number (a step that committed none of a row's tokens adds nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, Rollout, RolloutContext, register_algorithm
from dare_gym.algorithms.options import Clip, ClipHigher, GroupAdvantages, KLPenalty, ResponseMask
from dare_gym.core.device import uniform
from dare_gym.core.logprobs import token_log_probs
from dare_gym.core.losses import clipped_surrogate, kl_penalty

TEMPERATURE = "agrpo.temperature"  # [N] the temperature the rollout was drawn at
STEPS = "agrpo.steps"  # [N, μ, M] the denoising steps each iteration trains
OLD_LOGP = "agrpo.old_logp"  # [N, μ − 1, M, L] π_old's log-probs in those states on iterations 1..μ−1
REF_LOGP = "agrpo.ref_logp"  # [N, μ, M, L] π_ref's (β > 0)


@dataclass
class AGRPOConfig(ResponseMask, GroupAdvantages, KLPenalty, ClipHigher, Clip, AlgorithmConfig):
    scale_rewards: str = "none"
    response_mask: str = "all"
    """every token a sampled step committed counts (EOS included), as the official loss"""
    mc_samples: int = 24
    """M: denoising steps sampled per completion and update (train.yaml: 24; one forward each)"""
    low_discrepancy: bool = True
    """stratify the B·M uniform draws of a batch (u = (perm + U)/(B·M)) instead of drawing them independently"""

    def check(self):
        if isinstance(self.mc_samples, bool) or not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {self.mc_samples!r}")
        if not isinstance(self.low_discrepancy, bool):
            raise ValueError(f"low_discrepancy must be true or false, got {self.low_discrepancy!r}")


@dataclass
class TemperatureRollout(Rollout):
    """The default rollout, its rows recording the temperature they were drawn at (AGRPO trains on logits / T)."""

    temperature: float = 0.0

    def buffer(self, rewards, group_ids, correct=None):
        buffer = super().buffer(rewards, group_ids, correct)
        buffer.columns[TEMPERATURE] = torch.full((len(buffer),), self.temperature)
        return buffer


def sample_steps(last_step: torch.Tensor, draws: int, *, low_discrepancy: bool,
                 generator: torch.Generator | None) -> torch.Tensor:
    """[B, draws] steps uniform on 0..last_step[b] per row: floor(u · (last + 1)), with u stratified over the
    batch's B·draws values when ``low_discrepancy`` (one value in each interval [k/S, (k+1)/S), shuffled)."""
    count = last_step.numel() * draws
    u = uniform(count, generator, last_step.device)
    if low_discrepancy:
        draw_on = generator.device if generator is not None else last_step.device
        order = torch.randperm(count, generator=generator, device=draw_on).to(last_step.device)
        u = (order + u) / count
    u = u.view(-1, draws)
    return torch.floor(u * (last_step[:, None] + 1)).long().clamp(max=last_step[:, None].clamp(min=0))


def last_content_step(unmask_step: torch.Tensor, completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B] the last step that committed a token other than EOS (0 where none did)."""
    return unmask_step.masked_fill(completion_ids == eos_token_id, -1).max(dim=1).values.clamp(min=0)


@register_algorithm("agrpo", AGRPOConfig)
class AGRPO(PolicyGradient):
    """Group advantages (the skeleton's); ``prepare`` draws each iteration's steps (and scores π_old / π_ref
    there when needed); the loss sums each sampled step's clipped token terms."""

    def build_estimator(self, mask_token_id):
        return None  # the sampled steps are replayed here, not by a registered estimator

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator, batch_size: int,
                settings: dict[str, Any], context: RolloutContext | None = None) -> Rollout:
        completions = policy.generate(list(prompts), generator=generator, batch_size=batch_size, **settings)
        options = dict(settings)
        _, resolved = policy.sampler_settings(options.pop("sampler", None), options)
        return TemperatureRollout(list(prompts), completions, policy, self.response_mask,
                                  temperature=float(resolved.temperature))

    # the states and their scores ------------------------------------------------------------------------
    def step_logp(self, policy, inputs, batch, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(o^k | x_s) from logits / T at every completion position, in each row's state before its step
        ``step`` [B] (the tokens committed earlier revealed, the rest masked), and [B, L] the tokens step s
        committed."""
        state = inputs.completion_ids.masked_fill(inputs.unmask_step >= step[:, None], self.mask_token_id)
        logits = policy.logits(torch.cat([inputs.prompt_ids, state], dim=1), inputs.attention_mask,
                               logits_to_keep=state.shape[1])
        temperature = batch.columns.get(TEMPERATURE)
        if temperature is not None:
            t = temperature.to(logits.device, logits.dtype)
            logits = logits / torch.where(t > 0, t, torch.ones_like(t))[:, None, None]
        return token_log_probs(logits, inputs.completion_ids), inputs.unmask_step == step[:, None]

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        config = self.config
        last = last_content_step(buffer.unmask_step, buffer.completion_ids, policy.tokenizer.eos_token_id)
        buffer.columns[STEPS] = torch.stack(
            [sample_steps(last, config.mc_samples, low_discrepancy=config.low_discrepancy, generator=generator)
             for _ in range(config.num_iterations)], dim=1)
        # π_old on iterations 1..μ−1 only: iteration 0 is one optimizer step over the whole batch, so π_old there
        # is π_θ detached (as PolicyGradient.prepare); π_ref on every iteration
        scorers = ([(OLD_LOGP, policy, range(1, config.num_iterations))] if config.num_iterations > 1 else []) + \
                  ([(REF_LOGP, reference, range(config.num_iterations))] if self.needs_reference else [])
        for column, scorer, iterations in scorers:
            chunks = []
            for rows in buffer.row_chunks(micro_batch_size):
                part = buffer.select(rows)
                inputs = self.model_inputs(part, policy.device)
                steps = part.columns[STEPS].to(policy.device)
                chunks.append(torch.stack([torch.stack([
                    self.step_logp(scorer, inputs, part, steps[:, i, j])[0]
                    for j in range(config.mc_samples)], dim=1) for i in iterations], dim=1).cpu())
            buffer.columns[column] = torch.cat(chunks)

    # the loss, one Monte-Carlo step at a time -----------------------------------------------------------
    def sample_losses(self, policy, batch, iteration) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
        """Per sampled step j: (1/(B·M)) Σ_i Σ_{k committed at s_ij} ℓ_k, so that the sum over j is the loss."""
        config = self.config
        inputs = self.model_inputs(batch, policy.device)
        steps = batch.columns[STEPS][:, iteration].to(policy.device)
        advantages = batch.advantage.to(policy.device)
        rows = batch.active_rows().to(policy.device)
        for j in range(config.mc_samples):
            logp, committed = self.step_logp(policy, inputs, batch, steps[:, j])
            mask = committed & inputs.completion_mask.bool() & rows[:, None]
            old = batch.columns[OLD_LOGP][:, iteration - 1, j].to(logp.device) if iteration > 0 else logp.detach()
            per_token, clip_active = clipped_surrogate(
                logp, old, advantages[:, None], epsilon_low=config.epsilon, epsilon_high=config.epsilon_high,
                log_ratio_clamp=config.log_ratio_clamp)
            metrics = {"clip_fraction": float((clip_active * mask).sum() / mask.sum().clamp(min=1)),
                       "scored_tokens": float(mask.sum())}
            if self.needs_reference:
                ref = batch.columns[REF_LOGP][:, iteration, j].to(logp.device)
                kl = kl_penalty(logp, ref, config.kl_estimator, clamp=config.kl_clamp) * torch.exp(logp - old)
                per_token = per_token + config.beta * kl
                metrics["kl_ref"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
            loss = (per_token * mask).sum() / (rows.sum().clamp(min=1) * config.mc_samples)
            yield loss, metrics

    def loss(self, policy, batch, iteration):
        losses, metrics = zip(*self.sample_losses(policy, batch, iteration))
        return torch.stack(losses).sum(), average(metrics)

    def backward(self, policy, batch, iteration, weight):
        """One backward per sampled step (one graph at a time, as the official trainer)."""
        total, all_metrics = 0.0, []
        for loss, metrics in self.sample_losses(policy, batch, iteration):
            (loss * weight).backward()
            total += loss.item()
            all_metrics.append(metrics)
        return total, average(all_metrics)


def average(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}
