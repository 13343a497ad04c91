"""Losses as small pure functions over tensors (formulas in ``reference/ALGORITHMS.md``).

Per-token tensors are ``[B, L]`` over completion positions; ``mask`` marks the tokens a loss counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dare_gym.core.distributed import global_mean
from dare_gym.core.logprobs import token_log_probs

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


def masked_diffusion_sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_lengths: torch.Tensor,
) -> torch.Tensor:
    """LLaDA's SFT objective (the masked-diffusion ELBO on the answer):
    ``(1/B) Σ_b Σ_{k masked} CE_k / (p_b · L_b^ans)``.

    Args:
        logits: [B, L, V] at the answer positions; targets: [B, L] the clean answer tokens.
        masked: [B, L] bool, the answer positions that were masked in the input.
        p_mask: [B] each row's masking probability; answer_lengths: [B] answer length with EOS padding.
    """
    ce = -token_log_probs(logits, targets)  # float32 cross-entropy in chunks (no full-vocabulary copy)
    per_row = (ce * masked.float()).sum(dim=1) / (p_mask * answer_lengths.float())
    return per_row.mean()


def block_diffusion_sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_lengths: torch.Tensor,
) -> torch.Tensor:
    """Block-diffusion SFT (SDAR, ALGORITHMS.md §B): ``Σ_b Σ_{k masked} CE_k / p_b``, divided by the number of
    answer tokens in the whole (micro-)batch ``Σ_b L_b^ans`` rather than row by row as in §A.

    Args:
        logits: [B, L, V] the noisy copy's logits at the answer positions (the doubled [x_t ; x_0] forward of
            :meth:`~dare_gym.models.families.ModelFamily.noisy_clean_forward`); targets: [B, L] the clean answer.
        masked: [B, L] bool, the answer positions masked in x_t.
        p_mask: [B] each row's masking probability; answer_lengths: [B] answer length with EOS padding.
    """
    ce = -token_log_probs(logits, targets)
    weighted = (ce * masked.float()).sum(dim=1) / p_mask
    return weighted.sum() / answer_lengths.sum().clamp(min=1).float()


def step_mean_loss(per_token: torch.Tensor, step_masks: list[torch.Tensor]) -> torch.Tensor:
    """CJ-GRPO's aggregation: a token mean over the batch within each denoising step, then the mean over
    steps, so every step weighs the same whatever it unmasks: (1/S) Σ_s Σ U_s ℓ / Σ U_s."""
    losses = [(per_token * mask).sum() / mask.sum().clamp(min=1) for mask in step_masks if mask.any()]
    return torch.stack(losses).mean()


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


def tracerl_loss(surrogate: torch.Tensor, kl: torch.Tensor | None, step_masks: list[torch.Tensor], *, beta: float,
                 padded_length: float | None) -> torch.Tensor:
    """TraceRL's loss over its rows (``surrogate``: the per-token −clipped surrogate; ``kl``: per-token k3).

    Block-causal models (dLLM-RL ``rl_sdar.py``, ``padded_length`` = L₁): mean_rows [(Σ −s + β Σ k3) / L₁].
    Full attention (``rl_llada.py``, ``padded_length=None``): each row normalised by its own number of targets
    and the KL summed per row, mean_rows [Σ −s / n_row + β Σ k3] (ALGORITHMS.md J)."""
    sums, counts = trace_rows(surrogate, step_masks)
    policy = sums / (counts.clamp(min=1) if padded_length is None else padded_length)
    if kl is None or beta == 0:
        return policy.mean()
    kl_sums, _ = trace_rows(kl, step_masks)
    kl_rows = kl_sums if padded_length is None else kl_sums / padded_length
    return (policy + beta * kl_rows).mean()


def reinforce_loss(sequence_scores: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """SPG's surrogate, no ratio and no clipping, weighted by length: Σ_i −A_i ℓ̂_i |o_i| / Σ_i |o_i|."""
    lengths = lengths.to(sequence_scores.dtype)
    return (-advantages * sequence_scores * lengths).sum() / lengths.sum().clamp(min=1)


def spg_elbo(draw_logp: list[torch.Tensor], draw_masks: list[torch.Tensor]) -> torch.Tensor:
    """SPG's lower bound per sequence: the mean over draws of the mean log-prob of the masked tokens
    (t = |𝓜|/|o| absorbs the 1/t weight)."""
    values = [(logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1) for logp, mask in zip(draw_logp, draw_masks)]
    return torch.stack(values).mean(dim=0)


def spg_eubo(draw_logp: list[torch.Tensor], draw_masks: list[torch.Tensor], valid: torch.Tensor,
             beta: float) -> torch.Tensor:
    """SPG's upper bound per sequence: (1/β) · mean over tokens seen of log mean_j[1[k∈𝓜_j] p_j^β / t_j],
    with t_j the draw's empirical mask ratio |𝓜_j| / |o|. Computed in log space."""
    length = valid.sum(dim=1, keepdim=True).clamp(min=1).to(draw_logp[0].dtype)
    terms = []
    for logp, mask in zip(draw_logp, draw_masks):
        ratio = mask.sum(dim=1, keepdim=True).clamp(min=1) / length
        terms.append(torch.where(mask, beta * logp - torch.log(ratio), torch.full_like(logp, float("-inf"))))
    log_mean = torch.logsumexp(torch.stack(terms), dim=0) - torch.log(torch.tensor(float(len(terms))))
    seen = torch.stack(draw_masks).any(dim=0) & valid.bool()
    per_token = torch.where(seen, log_mean, torch.zeros_like(log_mean))
    return per_token.sum(dim=1) / seen.sum(dim=1).clamp(min=1) / beta


def bgpo_sample_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor, *,
                     epsilon: float, dual_clip: float | None, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """BGPO's loss for one Monte-Carlo sample: the ELBO-ratio objective replaced by a bound linear in the
    sample (A > 0: A(1 + d) from eˣ ≥ 1 + x; A < 0: A·e^d by Jensen), d = 𝓑_j − 𝓑_old,j on identical masks,
    through PPO clipping (and dual-clip for A < 0). DARE spreads each sequence's loss over its tokens and takes
    the token mean, so sequences weigh by their length: Σ_i |o_i| loss_i / Σ_i |o_i| (``lengths`` = |o_i|)."""
    d = elbo - old_elbo
    ratio = torch.where(advantages > 0, 1 + d, importance_ratio(d, log_ratio_clamp))
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    if dual_clip is not None:
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    lengths = lengths.to(surrogate.dtype)
    return global_mean(-(surrogate * lengths).sum(), lengths.sum())


def dpo_pair_losses(policy_chosen: torch.Tensor, reference_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """[pairs] −log σ(β[(𝓑θ(y_w) − 𝓑ref(y_w)) − (𝓑θ(y_l) − 𝓑ref(y_l))]), DPO with (ELBO) log-likelihoods."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def dpo_loss(policy_chosen: torch.Tensor, reference_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss, the mean of :func:`dpo_pair_losses` over the pairs."""
    return dpo_pair_losses(policy_chosen, reference_chosen, policy_rejected, reference_rejected, beta).mean()


def espo_loss(elbo: torch.Tensor, old_elbo: torch.Tensor, ref_elbo: torch.Tensor | None, advantages: torch.Tensor,
              length: torch.Tensor, *, epsilon: float, beta: float, log_ratio_clamp: float | None = None,
              kl_clamp: float | None = None) -> torch.Tensor:
    """ESPO: a sequence ratio ρ = exp((𝓑 − 𝓑_old)/L) through PPO clipping, mean over sequences, plus
    β · Σ ½(𝓑 − 𝓑_ref)² / (B·L) (k2 on the raw ELBO, then divided by L; with ``kl_clamp`` each sequence's term
    is clamped to it)."""
    length = length.to(elbo.dtype)
    ratio = importance_ratio((elbo - old_elbo) / length, log_ratio_clamp)
    policy = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages).mean()
    if ref_elbo is None or beta == 0:
        return policy
    kl = 0.5 * (elbo - ref_elbo).square() / length
    return policy + beta * (kl if kl_clamp is None else kl.clamp(max=kl_clamp)).mean()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       epsilon: float) -> torch.Tensor:
    """PPO's clipped value loss per token: ½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -epsilon, epsilon)
    return 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())


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


def truncated_importance_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(log π_old − log π_rollout), cap), detached: the truncated importance weight (TIS) that corrects
    a loss for rollouts drawn from a slightly different policy (an approximate KV cache). Example: log-ratios
    (0, log 3, −log 2) with cap 2 give (1, 2, 0.5)."""
    return log_ratio.detach().exp().clamp(max=cap)


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
