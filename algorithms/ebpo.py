"""EBPO (ELBO-based block-level policy optimisation; LLaDA2.1): PPO on an all-block composite ELBO.

The LLaDA2.1 report's Eq. 4–5 as DARE implements it (``_forward_process_ebpo``, ``compute_ebpo_composite_elbo``,
``compute_policy_loss_ebpo``, ``compute_ebpo_kl``, ``ebpo_actor_mixin.py``; ALGORITHMS.md section P).

For a block-diffusion policy, log π(o) splits into one term per block given the clean blocks before it, and
each term is bounded by a masked-diffusion ELBO. One forward over the doubled input [x_n ; o] (the family's
``noisy_clean_forward``, section B) scores every block of noise row n at once:

    𝓑_n = Σ_j Σ_{k ∈ 𝓜_{n,j}} ℓ^k · len_j / m_{n,j},        𝓑 = (1/N) Σ_n 𝓑_n

Blocks lie on the grid of the packed prompt + response (the first and last response blocks may be partial);
block j of row n masks exactly m = min(⌊t·len_j⌋ + 1, len_j) of its len_j valid tokens at the stratified,
per-block-jittered level t = (u + (nK + j)/(NK)) mod 1. The masks are drawn once per sample after the rollout
and serve π_old, π_θ and π_ref alike. "Valid" tokens are those up to and including the first EOS (DARE's
LLaDA2/SDAR rollouts stop there; ``response_mask``); the scoring forward hides the positions after it, as DARE's
attention mask does.

A full-attention policy (LLaDA, Dream, the built-in ``tiny``: ``policy.block_size`` is None) has a single
block, the whole completion, whose only condition is the prompt; then the plain forward on [prompt ; noised
completion] is exactly that block's term, so EBPO runs on every family (DARE runs it on LLaDA2.x and SDAR only).

PPO then runs on one *sequence* ratio per completion, log ρ = 𝓑 − 𝓑_old (not divided by L, unlike ESPO),
clipped in the log domain, −A·exp(clipped log ρ), averaged over the sequences with a valid token; optional
β·KL (k1/k2/k3) on the composite ELBOs. A is verl's GRPO z-score (unbiased std + 1e-6).

Gradient with constant memory: the loss is first evaluated on a detached 𝓑 (N forwards without a graph) to get
g_i = ∂loss/∂𝓑_i; then each row n is re-run with a graph and Σ_i g_i·𝓑_{i,n}/N is backpropagated, so only one
row's graph is alive at a time and the gradient is the exact one. With μ = 1 (DARE's recipes) π_old is π_θ at
the update, so 𝓑_old is that first pass's value and no separate π_old pass is made.

DARE's recipes: lr 5e-7, 16 prompts × G = 8, mc_num N = 16, ε = 0.2, β = 0, μ = 1, block 32 (LLaDA2) or 4 (SDAR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, register_algorithm
from dare_gym.algorithms.options import Clip, ClipHigher, GroupAdvantages, KLPenalty, ResponseMask
from dare_gym.core.advantages import group_advantages, zero_variance_groups
from dare_gym.core.device import uniform
from dare_gym.core.distributed import global_mean, gradient_sync
from dare_gym.core.logprobs import token_log_probs
from dare_gym.core.losses import KL_ESTIMATORS

VERL_STD_EPS = 1e-6
MASKED, WEIGHT = "ebpo.masked", "ebpo.weight"  # buffer columns: [rows, N, L] masks and their len/m weights


@dataclass
class EBPOConfig(ResponseMask, GroupAdvantages, KLPenalty, ClipHigher, Clip, AlgorithmConfig):
    advantage_std_eps: float = VERL_STD_EPS
    response_mask: str = "through_eos"
    mc_num: int = 16
    """N, the noise rows per sample (DARE: 16); each costs a forward for the value and one for the gradient at
    every update, and one more for π_old (μ > 1) and π_ref (β > 0)"""

    def check(self):
        if isinstance(self.mc_num, bool) or not isinstance(self.mc_num, int) or self.mc_num < 1:
            raise ValueError(f"mc_num must be an integer >= 1, got {self.mc_num!r}")
        if not self.epsilon < 1:
            raise ValueError(f"epsilon must be < 1 (the log-domain clip takes log(1 - epsilon)), got {self.epsilon!r}")


# ----------------------------------------------------------------------------- the all-block ELBO


def response_blocks(attention_mask: torch.Tensor, valid: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """[B, L] the response block of each completion position, numbered 0, 1, … from the row's first response
    block (−1 where ``valid`` [B, L] is false). ``attention_mask`` [B, P + L] is the packed prompt + response
    (left padding, then the L completion columns). Blocks lie on the grid of the whole sequence: block id =
    ⌊position / block_size⌋, positions counted from the row's first real token, as the block-causal mask
    counts them, so the first and last response blocks may be partial. ``block_size=None`` (full attention):
    the whole response is one block."""
    valid = valid.bool()
    if block_size is None:
        return torch.where(valid, 0, -1)
    length = valid.shape[1]
    positions = (attention_mask.long().cumsum(dim=1) - 1)[:, -length:]
    grid = torch.div(positions, block_size, rounding_mode="floor")
    first = torch.where(valid, grid, torch.iinfo(grid.dtype).max).min(dim=1, keepdim=True).values
    return torch.where(valid, grid - first, -1)


def stratified_block_levels(u: torch.Tensor, rows: int, blocks: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[B, rows, K] EBPO's noise levels: sample b has ``rows`` × K_b cells, and cell c = n·K_b + j (row-major)
    gets t = (u_b + c/(rows·K_b)) mod 1, so row n's blocks share the strip [u + n/N, u + (n+1)/N): one
    level per row, stratified across rows and jittered across blocks. ``u`` [B] in [0, 1), ``blocks`` [B]
    the K_b; cells past K_b (up to ``width``, default max K_b) are 0. Example: u = 0.3, N = 2, K = 2 gives
    (0.3, 0.55 | 0.8, 0.05)."""
    blocks = blocks.long()
    width = int(blocks.max().clamp(min=1)) if width is None else width
    n = torch.arange(rows, device=u.device, dtype=torch.float64)[None, :, None]
    j = torch.arange(width, device=u.device, dtype=torch.float64)[None, None, :]
    count = blocks.to(torch.float64).clamp(min=1)[:, None, None]
    levels = (u.to(torch.float64)[:, None, None] + (n * count + j) / (rows * count)) % 1.0
    return torch.where(j < blocks[:, None, None], levels, torch.zeros_like(levels))


def block_mask_counts(levels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """m = min(⌊t·len⌋ + 1, len) tokens to mask in a block of ``len`` valid tokens at level t (so m ~ U{1..len}
    for t ~ U[0, 1)); 0 for an empty block. ``levels`` and ``lengths`` broadcast."""
    lengths = lengths.long()
    return torch.minimum(torch.floor(levels * lengths).long() + 1, lengths)


def block_elbo_noise(blocks: torch.Tensor, rows: int, generator: torch.Generator | None = None,
                     u: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """EBPO's masks for N = ``rows`` noise rows per sample (one set per sample, shared by π_old, π_θ, π_ref).

    ``blocks`` [B, L] from :func:`response_blocks`. Each sample draws u ~ U[0, 1) (or takes ``u`` [B]); block j
    of row n is at level t from :func:`stratified_block_levels` and masks exactly m = min(⌊t·len_j⌋ + 1, len_j)
    of its len_j valid tokens, chosen uniformly. Returns ``masked`` [B, N, L] bool and ``weight`` [B, N, L]
    (len_j/m on masked tokens, 0 elsewhere), so that Σ_k masked·weight·ℓ^k is one row's 𝓑_n."""
    samples, length = blocks.shape
    device = blocks.device
    valid = blocks >= 0
    width = int(blocks.max().clamp(min=0)) + 1
    index = blocks.clamp(min=0)
    lengths = torch.zeros(samples, width, dtype=torch.long, device=device).scatter_add_(1, index, valid.long())
    if u is None:
        u = uniform(samples, generator, device)
    levels = stratified_block_levels(u.to(device), rows, (lengths > 0).sum(dim=1), width)  # [B, N, K]
    counts = block_mask_counts(levels, lengths[:, None, :])  # [B, N, K]
    # A uniform subset of m tokens in each block: sort by (block, random key) and keep each block's first m.
    keys = uniform((samples, rows, length), generator, device).to(torch.float64)
    order = torch.where(valid, blocks.to(torch.float64), float("inf"))[:, None, :] + keys
    rank = order.argsort(dim=2).argsort(dim=2)
    starts = (lengths.cumsum(dim=1) - lengths)[:, None, :].expand(-1, rows, -1)  # valid tokens before block j
    expand = index[:, None, :].expand(-1, rows, -1)
    within = rank - starts.gather(2, expand)
    masked = (within < counts.gather(2, expand)) & valid[:, None, :]
    block_weight = (lengths[:, None, :] / counts.clamp(min=1)).to(torch.float32)
    weight = torch.where(masked, block_weight.gather(2, expand), torch.zeros((), device=device))
    return {"masked": masked, "weight": weight}


def block_elbo_row(logp: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B] one noise row's all-block ELBO 𝓑_n = Σ_j Σ_{k∈𝓜_{n,j}} ℓ^k · len_j/m_{n,j} (tokens summed, no length
    normaliser), from the token log-probs ``logp`` [B, L] of that row's forward."""
    return torch.where(masked, logp * weight, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(dim=1)


def scoring_mask(inputs) -> torch.Tensor:
    """[B, P + L] the prompt's real tokens and the valid response (up to and including the first EOS)."""
    return torch.cat([inputs.prompt_attention, inputs.completion_mask.to(inputs.prompt_attention.dtype)], dim=1)


def noised_logp(policy, inputs, masked: torch.Tensor) -> torch.Tensor:
    """[B, L] log f(o^k | c, x_n) at every completion position, x_n = o with ``masked`` [B, L] replaced by the mask
    token: block-causal policies score every block given the clean blocks before it in one forward on
    [x_n ; o] (the policy's noisy/clean forward); full-attention policies (one block) a plain forward on
    [prompt ; x_n]."""
    completion = inputs.completion_ids
    noisy = torch.cat([inputs.prompt_ids, completion.masked_fill(masked, policy.mask_token_id)], dim=1)
    logits = policy.logits(noisy, scoring_mask(inputs), logits_to_keep=completion.shape[1], clean_ids=inputs.input_ids)
    return token_log_probs(logits, completion)


def row_elbo(policy, inputs, masked: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B] 𝓑_n of one noise row (masks and len/m weights [B, L])."""
    return block_elbo_row(noised_logp(policy, inputs, masked), masked, weight)


@torch.no_grad()
def composite_elbo(policy, inputs, masked: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B] 𝓑 = (1/N) Σ_n 𝓑_n without a graph (masks and weights [B, N, L])."""
    rows = [row_elbo(policy, inputs, masked[:, n], weight[:, n]) for n in range(masked.shape[1])]
    return torch.stack(rows, dim=1).mean(dim=1)


# ------------------------------------------------------------------------------------------- the loss


def sequence_kl(elbo: torch.Tensor, ref_elbo: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """[B] KL estimates on sequence log-likelihoods (EBPO's composite ELBOs), d = 𝓑_θ − 𝓑_ref: k1 = d,
    k2 = d²/2, k3 = e^{−d} + d − 1 (DARE's ``compute_ebpo_kl``; no clamp). d = (0.1, −0.05) gives k3 =
    (0.004837, 0.001271)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = elbo - ref_elbo
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.exp(-d) + d - 1


def ebpo_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, advantages: torch.Tensor, rows: torch.Tensor | None = None,
              *, epsilon_low: float, epsilon_high: float | None = None, ref_elbo: torch.Tensor | None = None,
              beta: float = 0.0, kl_estimator: str = "k3", log_ratio_clamp: float | None = None,
              kl_clamp: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EBPO's loss on composite sequence ELBOs [B] (ALGORITHMS.md P; DARE's ``compute_policy_loss_ebpo``).

    log ρ = 𝓑 − 𝓑_old is clipped *in the log domain*: min(log ρ, log(1 + ε_hi)) where A ≥ 0, max(log ρ,
    log(1 − ε_lo)) where A < 0; each sequence's loss is −A·exp(clipped log ρ), which is −min(ρA, clip(ρ)A)
    without ever exponentiating the clipped side (no dual clip). Mean over the sequences ``rows`` [B] bool
    that have a valid response token (default: all), its normaliser summed over ranks; plus β · the mean
    sequence KL (:func:`sequence_kl`) when ``ref_elbo`` is given. ``log_ratio_clamp`` / ``kl_clamp`` (off in
    DARE) bound log ρ before the clip and each sequence's KL. Returns the loss and detached diagnostics
    (``clip_fraction``, ``kl_ref``)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low!r} / {epsilon_high!r}")
    rows = torch.ones_like(elbo, dtype=torch.bool) if rows is None else rows.bool()
    log_ratio = elbo - old_elbo
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    upper = torch.clamp(log_ratio, max=math.log1p(epsilon_high))
    lower = torch.clamp(log_ratio, min=math.log1p(-epsilon_low))
    clipped = torch.where(advantages >= 0, upper, lower)
    zero = torch.zeros((), dtype=elbo.dtype, device=elbo.device)
    per_sequence = torch.where(rows, -advantages * torch.exp(clipped), zero)
    count = rows.sum().to(elbo.dtype)
    loss = global_mean(per_sequence.sum(), count)
    active = (clipped != log_ratio) & rows
    metrics = {"clip_fraction": active.sum().detach() / count.clamp(min=1)}
    if ref_elbo is not None and beta != 0:
        kl = sequence_kl(elbo, ref_elbo, kl_estimator)
        kl = torch.where(rows, kl if kl_clamp is None else kl.clamp(-kl_clamp, kl_clamp), zero)
        loss = loss + beta * global_mean(kl.sum(), count)
        metrics["kl_ref"] = kl.sum().detach() / count.clamp(min=1)
    return loss, metrics


# ----------------------------------------------------------------------------------------- EBPO


@register_algorithm("ebpo", EBPOConfig)
class EBPO(Algorithm):
    config: EBPOConfig

    def advantages(self, buffer, group_size):
        config = self.config
        buffer.advantage = group_advantages(buffer.reward, group_size, scale_rewards=config.scale_rewards,
                                            baseline=config.baseline, std_eps=config.advantage_std_eps)
        if config.drop_zero_variance_groups:
            buffer = buffer.discard(zero_variance_groups(buffer.reward, group_size).repeat_interleave(group_size))
        return buffer

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        """One set of masks per sample, drawn now and kept for every iteration; 𝓑_old (μ > 1) and 𝓑_ref (β > 0)
        on them."""
        inputs = buffer.model_inputs(policy.device)
        blocks = response_blocks(scoring_mask(inputs), inputs.completion_mask, policy.block_size)
        noise = block_elbo_noise(blocks, self.config.mc_num, generator)
        buffer.columns[MASKED], buffer.columns[WEIGHT] = noise["masked"].cpu(), noise["weight"].cpu()
        scorers = [("old_elbo", policy)] if self.config.num_iterations > 1 else []
        if self.needs_reference:
            scorers.append(("ref_elbo", reference))
        for column, scorer in scorers:
            values = []
            for rows in buffer.row_chunks(micro_batch_size):
                chunk = buffer.select(rows)
                masked, weight = self._noise(chunk, policy.device)
                values.append(composite_elbo(scorer, chunk.model_inputs(policy.device), masked, weight).cpu())
            buffer.columns[column] = torch.cat(values)

    @staticmethod
    def _noise(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.columns[MASKED].to(device), batch.columns[WEIGHT].to(device)

    def loss(self, policy, batch, iteration):
        """The loss with every row's graph alive at once (memory grows with N); ``backward`` gives the same
        gradient one row at a time."""
        inputs = batch.model_inputs(policy.device)
        masked, weight = self._noise(batch, policy.device)
        rows = [row_elbo(policy, inputs, masked[:, n], weight[:, n]) for n in range(masked.shape[1])]
        return self._objective(torch.stack(rows, dim=1).mean(dim=1), batch)

    def _objective(self, elbo: torch.Tensor, batch) -> tuple[torch.Tensor, dict[str, float]]:
        config, device = self.config, elbo.device
        old = batch.columns["old_elbo"].to(device) if "old_elbo" in batch.columns else elbo.detach()
        ref = batch.columns["ref_elbo"].to(device) if "ref_elbo" in batch.columns else None
        rows = batch.active_rows().to(device)
        loss, parts = ebpo_loss(elbo, old, batch.advantage.to(device), rows, epsilon_low=config.epsilon,
                                epsilon_high=config.epsilon_high, ref_elbo=ref, beta=config.beta,
                                kl_estimator=config.kl_estimator, log_ratio_clamp=config.log_ratio_clamp,
                                kl_clamp=config.kl_clamp)
        count = max(int(rows.sum()), 1)
        drift = ((elbo.detach() - old).abs() * rows).sum() / count
        metrics = {name: float(value) for name, value in parts.items()}
        metrics.update(elbo=float((elbo.detach() * rows).sum() / count), elbo_drift=float(drift),
                       mc_samples=float(self.config.mc_num))
        return loss, metrics

    def backward(self, policy, batch, iteration, weight):
        """g = ∂(weight·loss)/∂𝓑 from a graph-free pass, then one forward and backward per noise row of
        Σ_i g_i 𝓑_{i,n} / N: the exact gradient with one row's graph alive at a time."""
        inputs = batch.model_inputs(policy.device)
        masked, weights = self._noise(batch, policy.device)
        proxy = composite_elbo(policy, inputs, masked, weights).requires_grad_(True)
        loss, metrics = self._objective(proxy, batch)
        (grad,) = torch.autograd.grad(loss * weight, proxy)
        samples = masked.shape[1]
        for n in range(samples):
            # distributed runs synchronise gradients once: on the last row's backward
            with gradient_sync(policy, n == samples - 1):
                (row_elbo(policy, inputs, masked[:, n], weights[:, n]) * grad).sum().div(samples).backward()
        return loss.item(), metrics
