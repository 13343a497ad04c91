"""Likelihood estimators for uniform-noise diffusion LMs (DiffusionGemma), and the uniform-noise SFT objective.

Masked-diffusion estimators (``dare_gym.core.estimators``) score tokens hidden behind [MASK]; a uniform-noise model
never saw [MASK]: it is trained to recover clean tokens from a canvas where some tokens were replaced by uniform
random ones. The derivations, with a worked example, are in ``docs/UNIFORM_NOISE.md``; in short (per completion
token x of N-token vocabulary, the noisy canvas z_t, α_t = 1 − t the schedule DiffusionGemma's recipe uses):

* forward process: each token independently kept with probability α_t, else replaced by a uniform draw from
  the N ids (which may redraw x): q_t(z | x) = α_t·[z = x] + (1 − α_t)/N. At t = 1 the canvas is pure noise,
  exactly the sampler's initial canvas.
* ``uniform_corruption`` (one forward; d1's place): draw t per row, corrupt the completion, score the clean
  tokens. ``objective: ce`` gives log p_θ(x | z_t) for every completion token — the quantity DiffusionGemma is
  trained to maximise (NeMo's ``base-sft``: cross-entropy on *every* canvas position, corrupted or not).
  ``objective: elbo`` gives each token's term of the continuous-time uniform-noise ELBO (UDLM, Schiff et al.
  2024; Duo, Sahoo et al. 2025, derived here from the CTMC path KL), whose expectation over t ~ U(0, 1) and z_t is
  a lower bound on log p_θ(x | prompt) for the reverse process that plugs the model's x̂_θ into the posterior:

      ELBO = − Σ_k ∫₀¹ E_{z_t} [ f ] dt,
      f = (β_t/N) ( N/x̄θ_z − N/x̄_z + Σ_{j≠z} (x̄_j/x̄_z) log( x̄_j x̄θ_z / (x̄_z x̄θ_j) ) )
      x̄ = N α_t e_x + (1 − α_t) 1,   x̄θ = N α_t x̂_θ(z_t) + (1 − α_t) 1,   β_t = −α_t'/α_t = 1/(1 − t)

  (z the noisy token at position k). One draw (t, z_t) per row and one forward score every token; the estimate
  is unbiased for the integral over [t_min, t_max] (weight t_max − t_min for t drawn uniformly there).
* ``uniform_trajectory`` (CJ-GRPO / TraceRL's place): replay the sampler's recorded canvases step by step, with
  the self-conditioning each step had (recomputed by the scored policy, detached), and score each final token
  under softmax(logits / T_s) at the step that accepted it (``dare_gym.samplers.diffusion_gemma``). Exact: at
  the rollout's own weights it returns the sampler's ``commit_logp``.

``uniform_sft_loss`` is DiffusionGemma's SFT objective (NeMo AutoModel / Megatron-Bridge's ``base-sft``): t ~
U(ε, 1) per example, answer tokens corrupted with probability t, mean cross-entropy over every answer position,
with two-pass self-conditioning (the first pass's detached logits fed to the second) for a random half of the
examples.

Which estimator replaces which: :data:`UNIFORM_COUNTERPARTS` (an algorithm configured with ``d1`` or
``random_ratio`` scores a uniform-noise model with ``uniform_corruption``, one configured with ``trajectory``
with ``uniform_trajectory``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.core.device import uniform
from dare_gym.core.estimators import ESTIMATORS, Draw, LikelihoodEstimator, LogitsFn, TokenScores, make_estimator
from dare_gym.core.logprobs import token_entropy, token_log_probs

OBJECTIVES = ("ce", "elbo")
CHUNK_ELEMENTS = 1 << 24  # positions × vocabulary per float64 chunk of the ELBO's vocabulary sums


def _present(batch) -> torch.Tensor:
    return batch.attention_mask[:, batch.prompt_length:].bool()


def corrupt(tokens: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator | None,
            present: torch.Tensor | None = None) -> torch.Tensor:
    """z_t: each token (where ``present``) replaced with probability ``t`` [B] by a uniform draw from
    0..vocab_size-1, the draw independent of the token (it may redraw it), so q_t(z | x) = α·[z = x] + (1 − α)/N."""
    replace = uniform(tokens.shape, generator, tokens.device) < t[:, None].to(tokens.device)
    if present is not None:
        replace &= present
    draw_on = generator.device if generator is not None else tokens.device
    noise = torch.randint(0, vocab_size, tokens.shape, generator=generator, device=draw_on).to(tokens.device)
    return torch.where(replace, noise, tokens)


def uniform_elbo_terms(logits: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, L] each token's ELBO integrand −f(t, z, x̂_θ) of the module docstring, at α = 1 − t [B], in float64.

    Written with x̄_j ∈ {a, b} (a = Nα + 1 − α at j = x, b = 1 − α elsewhere) so that only three model quantities
    are needed per position: log x̄θ at the clean token, at the noisy token, and Σ_j log x̄θ_j over the vocabulary.
    """
    n = logits.shape[-1]
    alpha = (1 - t.double())[:, None]
    log_p = torch.log_softmax(logits.double(), dim=-1) if logits.numel() <= CHUNK_ELEMENTS else None
    if log_p is None:  # the vocabulary sums in chunks of rows, so no full float64 copy of the batch is made
        sums, at_clean, at_noisy = [], [], []
        flat, rows = logits.reshape(-1, n), max(1, CHUNK_ELEMENTS // n)
        a_flat = alpha.expand(clean.shape).reshape(-1)
        for start in range(0, flat.shape[0], rows):
            chunk = torch.log_softmax(flat[start:start + rows].double(), dim=-1)
            bar = _log_bar(chunk, a_flat[start:start + rows, None], n)
            sums.append(bar.sum(dim=-1))
            at_clean.append(bar.gather(-1, clean.reshape(-1)[start:start + rows, None]).squeeze(-1))
            at_noisy.append(bar.gather(-1, noisy.reshape(-1)[start:start + rows, None]).squeeze(-1))
        total, log_clean, log_noisy = (torch.cat(x).view(clean.shape) for x in (sums, at_clean, at_noisy))
    else:
        bar = _log_bar(log_p, alpha[..., None], n)
        total = bar.sum(dim=-1)
        log_clean = bar.gather(-1, clean[..., None]).squeeze(-1)
        log_noisy = bar.gather(-1, noisy[..., None]).squeeze(-1)
    a, b = n * alpha + (1 - alpha), 1 - alpha
    same = noisy == clean
    bar_z = torch.where(same, a, b)  # x̄ at the noisy token
    # Σ_{j≠z} x̄_j log x̄θ_j = b Σ_j log x̄θ_j + (a − b) log x̄θ_x − x̄_z log x̄θ_z
    weighted = b * total + (a - b) * log_clean - bar_z * log_noisy
    model_term = (weighted - (n - bar_z) * log_noisy) / bar_z  # Σ_{j≠z} (x̄_j/x̄_z) log(x̄θ_j/x̄θ_z)
    data_term = torch.where(same, (n - 1) * (b / a) * torch.log(b / a), (a / b) * torch.log(a / b))
    beta = 1 / alpha  # −α'/α with α = 1 − t
    f = (beta / n) * (n / torch.exp(log_noisy) - n / bar_z + data_term - model_term)
    return -f


def _log_bar(log_p: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """log x̄θ = log(N α p + 1 − α), from log p, without cancellation."""
    return torch.logaddexp(torch.log(n * alpha) + log_p, torch.log1p(-alpha).expand_as(log_p))


# ---------------------------------------------------------------------------------------------- one pass


@dataclass
class UniformCorruption:
    """One forward on a uniformly corrupted completion (t ~ U(t_min, t_max) per row; the prompt stays clean, as
    DiffusionGemma's encoder reads it), scoring every clean completion token: ``ce`` log p_θ(x | z_t) (the
    training objective's term), ``elbo`` the token's ELBO term weighted by (t_max − t_min). Noise drawn once
    serves π_θ, π_old and π_ref alike. ``mask_token_id`` is unused (kept for the estimator signature)."""

    mask_token_id: int | None = None
    vocab_size: int | None = None
    objective: str = "ce"
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "uniform_corruption"
    forwards_per_sample: int = 1

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (0 <= self.t_min < self.t_max <= 1):
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min!r}, t_max={self.t_max!r}")
        if self.objective == "elbo" and self.t_min <= 0:
            raise ValueError("the elbo objective needs t_min > 0: its integrand has a log(1/t) singularity at t = 0 "
                             f"(got t_min={self.t_min!r})")

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        if self.vocab_size is None:
            raise ValueError("uniform_corruption needs the model's vocabulary size (vocab_size=) to draw noise from")
        ids = batch.completion_ids
        t = self.t_min + (self.t_max - self.t_min) * uniform(ids.shape[0], generator, ids.device, torch.float64)
        noisy = corrupt(ids, t.float(), self.vocab_size, generator, _present(batch))
        return {"t": t, "noisy": noisy}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        noisy = noise["noisy"].to(batch.completion_ids.device)
        logits = logits_fn(torch.cat([batch.prompt_ids, noisy], dim=1), batch.attention_mask,
                           logits_to_keep=noisy.shape[1], clean_ids=batch.input_ids)
        scored = _present(batch)
        if self.objective == "ce":
            logp = token_log_probs(logits, batch.completion_ids)
            weight = torch.ones(noisy.shape[0], device=logp.device)
        else:
            logp = uniform_elbo_terms(logits, batch.completion_ids, noisy, noise["t"].to(logits.device)).float()
            logp = logp * (self.t_max - self.t_min)
            weight = torch.ones(noisy.shape[0], device=logp.device)
        logp = torch.where(scored, logp, torch.zeros_like(logp))
        return TokenScores(logp, scored, token_entropy(logits), [Draw(logp, scored, weight)])


# --------------------------------------------------------------------------------------- trajectory


@dataclass
class UniformTrajectory:
    """Replay of the DiffusionGemma sampler's trace (``batch.trace``): for canvas j and step s, the recorded
    canvas is decoded after the prompt and the final canvases before j, with the previous replayed step's
    processed logits as self-conditioning (detached: part of the state, like the canvas), and each final token is
    scored under log_softmax(logits / T_s) at its acceptance step (``unmask_step``). Tokens the pad rule wrote
    are not scored. One forward per step a row was denoising."""

    mask_token_id: int | None = None
    vocab_size: int | None = None
    name: str = "uniform_trajectory"
    forwards_per_sample = None
    deterministic = True
    scores_commit_states = True

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        trace = getattr(batch, "trace", None) or {}
        missing = [k for k in ("canvas", "active", "temperature", "filled") if k not in trace]
        if missing:
            raise ValueError(f"uniform_trajectory replays the diffusion_gemma sampler's trace; this batch has none "
                             f"of {missing} (roll out with sampler diffusion_gemma)")
        if batch.unmask_step is None:
            raise ValueError("uniform_trajectory needs the rollout's unmask_step (each token's acceptance step)")
        scored = _present(batch) & ~trace["filled"].bool()
        return {"acceptance_step": batch.unmask_step.masked_fill(~scored, -1)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        trace = batch.trace
        step_of = noise["acceptance_step"]
        rows, length = batch.completion_ids.shape
        canvases_steps, size = trace["canvas"].shape[1:]
        canvases = length // size
        steps = canvases_steps // canvases
        active = trace["active"].bool()
        logp = torch.zeros(rows, length, device=batch.completion_ids.device)
        entropy = torch.zeros_like(logp)
        draws = []
        prompt_width = batch.prompt_length
        for j in range(canvases):
            begin, end = j * size, (j + 1) * size
            context = batch.input_ids[:, :prompt_width + begin]
            context_mask = batch.attention_mask[:, :prompt_width + begin]
            mask = torch.cat([context_mask, batch.attention_mask[:, prompt_width + begin:prompt_width + end]], dim=1)
            final = batch.completion_ids[:, begin:end]
            targets_j = step_of[:, begin:end]
            self_conditioning = None
            for s in range(steps):
                g = j * steps + s
                if not bool(active[:, g].any()):
                    break
                canvas = trace["canvas"][:, g].long()
                logits = logits_fn(torch.cat([context, canvas], dim=1), mask, logits_to_keep=size,
                                   self_conditioning=self_conditioning)
                processed = logits / trace["temperature"][:, g, None, None].to(logits.dtype)
                targets = (targets_j == g) & active[:, g, None]
                if bool(targets.any()):
                    step_logp = token_log_probs(processed, final)
                    full = torch.zeros_like(logp)
                    full[:, begin:end] = torch.where(targets, step_logp, torch.zeros_like(step_logp))
                    target_full = torch.zeros_like(logp, dtype=torch.bool)
                    target_full[:, begin:end] = targets
                    logp = torch.where(target_full, full, logp)
                    entropy[:, begin:end] = torch.where(targets, token_entropy(processed), entropy[:, begin:end])
                    draws.append(Draw(full, target_full, torch.ones(rows, device=logp.device)))
                self_conditioning = processed.detach()
        return TokenScores(logp, step_of >= 0, entropy, draws)


UNIFORM_ESTIMATORS = {"uniform_corruption": UniformCorruption, "uniform_trajectory": UniformTrajectory}
# The masked estimator an algorithm names -> the uniform-noise one that plays its part, and the options that carry
# over (a mask-only option set explicitly is an error: it would silently mean nothing).
UNIFORM_COUNTERPARTS = {
    "d1": ("uniform_corruption", {}),
    "random_ratio": ("uniform_corruption", {"t_min": "t_min"}),
    "trajectory": ("uniform_trajectory", {}),
}


def uniform_counterpart(name: str, options: dict) -> tuple[str, dict]:
    """(estimator, options) that score a uniform-noise model where an algorithm asks for ``name``."""
    if name in UNIFORM_ESTIMATORS:
        return name, dict(options)
    if name not in UNIFORM_COUNTERPARTS:
        known = ", ".join(f"{m} -> {u}" for m, (u, _) in UNIFORM_COUNTERPARTS.items())
        raise ValueError(f"estimator {name!r} masks tokens with [MASK] and has no uniform-noise counterpart ({known}; "
                         f"or name one of {', '.join(UNIFORM_ESTIMATORS)} directly)")
    target, carried = UNIFORM_COUNTERPARTS[name]
    if name == "trajectory":
        if options.get("shrink", 1) != 1 or options.get("order", "sampler") != "sampler":
            raise ValueError(f"estimator 'trajectory' on a uniform-noise model replays every sampler step "
                             f"(uniform_trajectory): shrink must be 1 and order 'sampler', got {options!r}")
        return target, {}
    dropped = sorted(set(options) - set(carried))
    if dropped:
        raise ValueError(f"estimator {name!r} options {dropped} mask tokens with [MASK]; on a uniform-noise model "
                         f"it is {target}, whose options are: objective, t_min, t_max")
    return target, {carried[k]: v for k, v in options.items()}


def make_noise_estimator(name: str, *, mask_token_id: int | None, noise: str = "mask", vocab_size: int | None = None,
                         **options) -> LikelihoodEstimator:
    """The estimator ``name`` for a model that undoes ``noise`` (its family's): on ``uniform`` a masked estimator's
    name resolves to its uniform counterpart (``d1`` -> ``uniform_corruption``, ``trajectory`` ->
    ``uniform_trajectory``), drawing its noise from ``vocab_size`` ids; a masked estimator without one, or a
    uniform one for a masked model, is an error that says so."""
    if noise == "uniform":
        name, options = uniform_counterpart(name, options)
        try:
            return UNIFORM_ESTIMATORS[name](mask_token_id=mask_token_id, vocab_size=vocab_size, **options)
        except TypeError as error:
            raise ValueError(f"bad options {options!r} for estimator {name!r}: {error}") from None
    if noise != "mask":
        raise ValueError(f"noise must be 'mask' or 'uniform', got {noise!r}")
    if name in UNIFORM_ESTIMATORS:
        raise ValueError(f"estimator {name!r} scores uniform-noise models (DiffusionGemma); this model undoes "
                         f"{noise} noise")
    return make_estimator(name, mask_token_id=mask_token_id, **options)


# ------------------------------------------------------------------------------------------------ SFT


def sft_noise(answers: torch.Tensor, present: torch.Tensor, vocab_size: int, generator: torch.Generator | None, *,
              eps: float = 1e-3, self_conditioning_p: float = 0.5) -> dict[str, torch.Tensor]:
    """One draw of DiffusionGemma's SFT noise for ``answers`` [B, L] (on the CPU, as the SFT columns live):
    t ~ U(eps, 1) per row, the corrupted answers, and which rows use two-pass self-conditioning."""
    answers = answers.cpu()
    t = eps + (1 - eps) * uniform(answers.shape[0], generator, "cpu")
    noisy = corrupt(answers, t, vocab_size, _cpu(generator), present.cpu().bool())
    use_sc = uniform(answers.shape[0], generator, "cpu") < self_conditioning_p
    return {"t": t, "noisy": noisy, "self_conditioning": use_sc}


def _cpu(generator):
    return generator if generator is None or generator.device.type == "cpu" else None


def uniform_sft_loss(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                     present: torch.Tensor, noisy: torch.Tensor, self_conditioning: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean cross-entropy of the clean ``answers`` over their ``present`` positions, given
    the corrupted ``noisy`` answers; rows with ``self_conditioning`` [B] bool are decoded a second time with the
    first pass's detached logits as self-conditioning, and score that second pass (the recipe's Analog-Bits
    two-pass training). The prompt is the clean encoder context; earlier canvases are clean too."""
    ids = torch.cat([prompt_ids, noisy], dim=1)
    clean = torch.cat([prompt_ids, answers], dim=1)
    mask = torch.cat([prompt_mask, present.long()], dim=1)
    keep = answers.shape[1]
    if bool(self_conditioning.any()):
        with torch.no_grad():  # the first pass only feeds the second (detached, as the recipe trains it)
            first = policy.logits(ids, mask, logits_to_keep=keep, clean_ids=clean)
        # rows without self-conditioning get its zero signal: the same computation as a pass without it
        logits = policy.logits(ids, mask, logits_to_keep=keep, clean_ids=clean, self_conditioning=first,
                               self_conditioning_mask=self_conditioning.to(ids.device))
    else:
        logits = policy.logits(ids, mask, logits_to_keep=keep, clean_ids=clean)
    nll = -token_log_probs(logits, answers)
    present = present.float()
    return ((nll * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)).mean()


ESTIMATORS.update(UNIFORM_ESTIMATORS)

__all__ = ["UniformCorruption", "UniformTrajectory", "UNIFORM_ESTIMATORS", "UNIFORM_COUNTERPARTS",
           "uniform_counterpart", "make_noise_estimator", "corrupt", "uniform_elbo_terms", "sft_noise", "uniform_sft_loss"]
