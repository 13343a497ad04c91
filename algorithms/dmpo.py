"""DMPO (distribution matching policy optimisation; Zhu et al., 2025): fit the reward-tilted distribution with a
weighted denoising cross-entropy instead of a clipped ratio objective.

The target of KL-regularised RL is p*(o) ∝ p_pre(o) · exp(r(o)/α). DMPO matches it by cross-entropy on the
rollouts, importance-weighted from the rollout policy p_cur to p*: within each group, a self-normalised softmax of
log(p_pre/p_cur) + r/α. The likelihoods are masked-diffusion ELBOs, computed once per batch under p_cur (the policy
before the update) and p_pre (the frozen reference) on shared antithetic masks (``elbo_replicates`` masks: pairs of a
random mask with λ ~ U[0.1, 0.9] per token and its complement; weight L/m, L every generated position, m the masked
count). A second softmax with −r/α weights the samples to push away from (the official "negative" centering):

    log_rnd_i = 𝓑_pre,i − 𝓑_cur,i
    w⁺ = softmax_g(log_rnd + r/α),   w⁻ = softmax_g(log_rnd − r/α),   c_i = w⁺_i − s·w⁻_i
    loss = mean over groups of Σ_{i∈g} c_i · (1/R) Σ_j (1/m_ij) Σ_{k masked in j} −log π_θ(o_i^k | x_ij)

with R = ``num_replicates`` fresh antithetic masks per iteration (the weighted denoising cross-entropy, "WDCE";
the constant factor L of each 1/t = L/m is left out, as in the official code). No ratio, no clipping; the μ inner
iterations reuse the batch's weights with fresh masks. Every generated position counts, EOS padding included
(``response_mask: all``: the official masks and sums over the whole generation).

Followed: the official code (github yuchen-zhu-zyc/DMPO at 96af1a4, ``DMPO/dmpo_trainer.py`` ``compute_loss`` with
``loss: wdce``, ``compute_log_prob_elbo``, the advantages of ``_generate_and_score_completions``, and
``DMPO/dmpo_train_config.yaml``) and the paper (arXiv 2510.08233). Defaults: the config's recipe: α = 0.04,
μ = 8, R = 4 antithetic, 4 ELBO replicates, mask rate clamped to [0.1, 0.9], negative centering with strength 1
(lr 1e-6, G = 16, rollout temperature 0.2). Deviations: the official loss is a sum over its micro-batch of 8 rows
(half a group of 16); here it is the mean over groups of each group's sum, a constant factor (the learning rate's
scale). Not implemented: the ``ddo`` loss, the adaptive coefficient (``ada_coeff``, off in the recipe) and α = −1
(raw rewards as weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, register_algorithm
from dare_gym.algorithms.options import ResponseMask, is_number
from dare_gym.core.device import uniform
from dare_gym.core.logprobs import token_log_probs

WEIGHT = "dmpo.weight"  # [N] (N/#groups) · (w⁺ − s·w⁻): each row's coefficient in the loss
MASKS = "dmpo.masks"  # [N, μ, R, L] each iteration's antithetic loss masks
LOG_RND = "dmpo.log_rnd"  # [N] 𝓑_pre − 𝓑_cur (for logs and tests)
ELBO_MASKS = "dmpo.elbo_masks"  # [N, R_elbo, L] the masks of those ELBOs (kept for tests)


@dataclass
class DMPOConfig(ResponseMask, AlgorithmConfig):
    num_iterations: int = 8
    response_mask: str = "all"
    alpha: float = 0.04
    """α: the temperature of the target p* ∝ p_pre · exp(r/α); 0: weights softmax(±r) with no reference model"""
    centering_strength: float = 1.0
    """s: the weight of the negative softmax w⁻ subtracted from w⁺"""
    num_replicates: int = 4
    """R: antithetic masks (mask, complement) per completion and update in the loss (even)"""
    elbo_replicates: int = 4
    """antithetic masks per completion for the ELBOs under p_cur and p_pre that make the weights (even)"""
    mask_prob_clamp: bool = True
    """draw each mask's rate λ in [0.1, 0.9] (true) or [0, 1) (false)"""

    def check(self):
        if not (is_number(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0, got {self.alpha!r}")
        if not is_number(self.centering_strength):
            raise ValueError(f"centering_strength must be a number, got {self.centering_strength!r}")
        for name in ("num_replicates", "elbo_replicates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"{name} must be an even integer >= 2 (antithetic pairs), got {value!r}")
        if not isinstance(self.mask_prob_clamp, bool):
            raise ValueError(f"mask_prob_clamp must be true or false, got {self.mask_prob_clamp!r}")


def antithetic_masks(present: torch.Tensor, replicates: int, *, clamp: bool,
                     generator: torch.Generator | None) -> torch.Tensor:
    """[B, R, L] masks over the ``present`` positions: R/2 random masks (each position masked with probability λ,
    λ ~ U[0.1, 0.9] with ``clamp``, else U[0, 1), one λ per mask) followed by their complements."""
    rows, length = present.shape
    half = replicates // 2
    rate = uniform((rows, half), generator, present.device)
    if clamp:
        rate = 0.1 + 0.9 * rate
    first = uniform((rows, half, length), generator, present.device) < rate[..., None]
    return torch.cat([first, ~first], dim=1) & present[:, None, :].bool()


def dmpo_weights(log_rnd: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor, *, alpha: float,
                 centering_strength: float) -> torch.Tensor:
    """[N] (N/#groups) · (w⁺ − s·w⁻) with w± = softmax over the row's group of log_rnd ± r/α (α = 0: of ±r
    alone), so that the row mean of weight · ℓ is the mean over groups of Σ_{i∈g} (w⁺ − s·w⁻)_i ℓ_i."""
    weights = torch.zeros_like(log_rnd)
    groups = torch.unique(group_ids)
    for group in groups:
        rows = group_ids == group
        if alpha > 0:
            plus, minus = log_rnd[rows] + rewards[rows] / alpha, log_rnd[rows] - rewards[rows] / alpha
        else:
            plus, minus = rewards[rows], -rewards[rows]
        weights[rows] = torch.softmax(plus, dim=0) - centering_strength * torch.softmax(minus, dim=0)
    return weights * len(group_ids) / len(groups)


@register_algorithm("dmpo", DMPOConfig)
class DMPO(Algorithm):
    """``prepare`` scores the ELBOs under p_cur and p_pre, makes the weights and draws every iteration's loss masks;
    the loss is the weighted denoising cross-entropy."""

    @property
    def needs_reference(self) -> bool:
        return self.config.alpha > 0

    def advantages(self, buffer, group_size):
        return buffer  # the weights need the ELBOs under p_cur and p_pre: made in prepare

    def masked_logp(self, policy, inputs, masks: torch.Tensor) -> torch.Tensor:
        """[B, L] log π(o^k | the completion with ``masks`` [B, L] masked), the clean sequence alongside (a
        block-causal model scores each noised block given the clean blocks before it)."""
        noisy = inputs.completion_ids.masked_fill(masks, self.mask_token_id)
        logits = policy.logits(torch.cat([inputs.prompt_ids, noisy], dim=1), inputs.attention_mask,
                               logits_to_keep=noisy.shape[1], clean_ids=inputs.input_ids)
        return token_log_probs(logits, inputs.completion_ids)

    def elbo(self, policy, inputs, masks: torch.Tensor) -> torch.Tensor:
        """[B] the antithetic ELBO: mean over the R masks of (L/m) Σ_{masked} log π, L the generated positions."""
        length = inputs.attention_mask[:, inputs.prompt_length:].sum(dim=1).clamp(min=1)
        values = []
        for j in range(masks.shape[1]):
            counts = masks[:, j].sum(dim=1).clamp(min=1)
            logp = self.masked_logp(policy, inputs, masks[:, j])
            values.append((length / counts) * (logp * masks[:, j]).sum(dim=1))
        return torch.stack(values).mean(dim=0)

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        config = self.config
        present = buffer.model_inputs("cpu").attention_mask[:, buffer.prompt_ids.shape[1]:].bool()
        log_rnd = torch.zeros(len(buffer))
        if self.needs_reference:
            masks = antithetic_masks(present, config.elbo_replicates, clamp=config.mask_prob_clamp, generator=generator)
            for rows in buffer.row_chunks(micro_batch_size):
                inputs = self.model_inputs(buffer.select(rows), policy.device)
                chunk = masks[rows].to(policy.device)
                log_rnd[rows] = (self.elbo(reference, inputs, chunk) - self.elbo(policy, inputs, chunk)).float().cpu()
            buffer.columns[ELBO_MASKS] = masks
        buffer.columns[LOG_RND] = log_rnd
        buffer.columns[WEIGHT] = dmpo_weights(log_rnd, buffer.reward.float(), buffer.group_id, alpha=config.alpha,
                                              centering_strength=config.centering_strength)
        buffer.advantage = buffer.columns[WEIGHT] * len(torch.unique(buffer.group_id)) / len(buffer)  # w⁺ − s·w⁻
        buffer.columns[MASKS] = torch.stack(
            [antithetic_masks(present, config.num_replicates, clamp=config.mask_prob_clamp, generator=generator)
             for _ in range(config.num_iterations)], dim=1)

    def loss(self, policy, batch, iteration):
        inputs = self.model_inputs(batch, policy.device)
        masks = batch.columns[MASKS][:, iteration].to(policy.device)
        cross_entropy = []
        for j in range(masks.shape[1]):
            logp = self.masked_logp(policy, inputs, masks[:, j])
            cross_entropy.append(-(logp * masks[:, j]).sum(dim=1) / masks[:, j].sum(dim=1).clamp(min=1))
        per_row = torch.stack(cross_entropy).mean(dim=0)  # (1/R) Σ_j (1/m_ij) Σ_masked −log π
        weights = batch.columns[WEIGHT].to(per_row.device)
        rows = batch.active_rows().to(per_row.device)
        loss = (weights * per_row * rows).sum() / rows.sum().clamp(min=1)
        return loss, {"masked_cross_entropy": float((per_row.detach() * rows).sum() / rows.sum().clamp(min=1)),
                      "log_rnd": float(batch.columns[LOG_RND].mean())}
