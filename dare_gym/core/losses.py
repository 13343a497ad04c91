"""The loss pieces two or more algorithms share, as small pure functions over tensors (formulas in
``reference/ALGORITHMS.md``): the importance ratio and its clipped surrogate, GSPO's sequence ratio, the KL
estimators, ``loss_type`` aggregation, TraceRL's step rows (TraceRL, PPO) and the truncated importance weight.
What one algorithm alone uses lives in its own file.

Per-token tensors are ``[B, L]`` over completion positions; ``mask`` marks the tokens a loss counts.
"""

from __future__ import annotations


import torch

from dare_gym.core.distributed import global_mean

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# verl bounds the log-ratio inside its k3 ("low_var_kl") before exponentiating, so that exp cannot overflow.
KL_LOG_RATIO_BOUND = 20.0


def importance_ratio(log_ratio: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """ρ = exp(log π_θ − log π_old). With ``clamp = c`` the log-ratio is first clamped to [−c, c] (verl clamps
    it to ±20, dLLM-RL's block-diffusion script to ±10): a token far off-policy cannot overflow, and outside
    the bound its gradient is zero, as there."""
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"the log-ratio clamp must be > 0 or null, got {clamp!r}")
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a loss, per token: ``-min(ρA, clip(ρ, 1-ε_lo, 1+ε_hi)A)``.

    ``advantages`` broadcasts against ``logp`` (``[B, 1]`` for sequence advantages). With ``dual_clip = c``
    the loss of a negative-advantage token is capped at ``-c·A`` (Ye et al., 2020); with ``log_ratio_clamp``
    the log-ratio is clamped before it is exponentiated (:func:`importance_ratio`). Returns the loss and a
    float mask of the tokens where clipping was active.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = importance_ratio(logp - old_logp, log_ratio_clamp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
        advantages = advantages.expand_as(surrogate)
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    clip_active = (clipped < unclipped).float()
    return -surrogate, clip_active


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's importance ratio per token (``importance_sampling_level="sequence"``): the value is the
    length-normalised sequence log-ratio (1/|o|) Σ_t (ℓ_t − ℓ_old,t), the gradient that of each token
    (GSPO-token: sg[s_i]·π_t/sg[π_t])."""
    weights = mask.to(logp.dtype)
    mean = ((logp - old_logp) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return mean.detach()[:, None] + logp - logp.detach()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", *,
               clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman's k1 / k2 / k3), u = ref − θ.

    With ``clamp = c`` the estimate is clamped to [−c, c] (verl clamps k3 to ±10), and u to ±20 first, as verl
    does, so that e^u stays finite and the clamped tokens get a zero gradient rather than NaN."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"the KL clamp must be > 0 or null, got {clamp!r}")
    u = ref_logp - logp
    if clamp is not None:
        u = u.clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    if estimator == "k1":
        kl = -u
    elif estimator == "k2":
        kl = 0.5 * u.square()
    else:
        kl = torch.exp(u) - u - 1
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "bnpo",
    *,
    max_completion_length: int | None = None,
    num_active_tokens: float | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar with TRL's ``loss_type`` names.

    grpo: mean over sequences of each sequence's token mean. bnpo: token mean over the batch.
    dr_grpo: token sum / (B · max_completion_length). dapo: token sum / active tokens in the whole
    (accumulated, global) batch, given as ``num_active_tokens`` (a minibatch's share of it: see
    ``PolicyGradient.prepare``); without it, this batch's own count (then dapo equals bnpo).
    ``rows`` ([B] bool) are the sequences that count (default: all). Every normaliser is summed over the
    ranks of a distributed run (:func:`dare_gym.core.distributed.global_mean`), so the ranks' losses add up to the
    loss of their union.
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    sequences = per_token.new_tensor(per_token.shape[0]) if rows is None else rows.sum().to(per_token.dtype)
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return global_mean(per_sequence.sum(), sequences)
    if loss_type == "bnpo":
        return global_mean(total, mask.sum())
    if loss_type == "dr_grpo":
        length = max_completion_length or per_token.shape[1]
        return global_mean(total, sequences * length)
    if loss_type == "dapo":
        count = mask.sum() if num_active_tokens is None else torch.as_tensor(num_active_tokens, dtype=total.dtype)
        return global_mean(total, count)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")



def trace_rows(per_token: torch.Tensor, step_masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TraceRL's training rows: one per (rollout, replayed step group) that has targets. Returns each row's
    Σ_targets of ``per_token`` and its number of targets ([R] each)."""
    sums = [(per_token * mask).sum(dim=1)[mask.any(dim=1)] for mask in step_masks]
    counts = [mask.sum(dim=1)[mask.any(dim=1)] for mask in step_masks]
    return torch.cat(sums), torch.cat(counts).to(per_token.dtype)


def trace_row_losses(per_token: torch.Tensor, step_masks: list[torch.Tensor], padded_length: float) -> torch.Tensor:
    """TraceRL's rows for block-causal models: one per (rollout, replayed step) that has targets, each
    Σ_targets loss / L₁ (L₁: the padded response length)."""
    sums, _ = trace_rows(per_token, step_masks)
    return sums / padded_length



def truncated_importance_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(log π_old − log π_rollout), cap), detached: the truncated importance weight (TIS) that corrects
    a loss for rollouts drawn from a slightly different policy (an approximate KV cache). Example: log-ratios
    (0, log 3, −log 2) with cap 2 give (1, 2, 0.5)."""
    return log_ratio.detach().exp().clamp(max=cap)
