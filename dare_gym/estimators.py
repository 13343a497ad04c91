"""Per-token log-likelihood estimators for diffusion LMs: their own layer, chosen by name.

A dLLM has no exact sequence log-probability, so policy-gradient methods score completion tokens under some
noised input. Every estimator works in two phases so that the current, old and reference policies can be
scored on *identical* noise (the ratio and the KL then compare like with like):

    noise = estimator.sample_noise(batch, generator)        # masks, noise levels: tensors with rows first
    scores = estimator.token_logp(logits_fn, batch, noise)  # TokenScores: logp [B, L] and which are scored

``logits_fn(input_ids, attention_mask) -> logits`` is the policy's family-aligned forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TokenScores:
    logp: torch.Tensor  # [B, L] log f(o^k | noised input) at completion positions
    scored: torch.Tensor  # [B, L] bool: the positions this estimate covers
    entropy: torch.Tensor | None = None  # [B, L] detached entropy of the predictive distribution (for logs)


class LikelihoodEstimator(Protocol):
    name: str
    forwards_per_sample: int

    def sample_noise(self, batch, generator: torch.Generator | None) -> dict[str, torch.Tensor]: ...

    def token_logp(self, logits_fn: LogitsFn, batch, noise: dict[str, torch.Tensor]) -> TokenScores: ...


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materialising the full log-softmax (vocabularies are large)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-probabilities in half precision are too coarse for ratios
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _score(logits_fn: LogitsFn, batch, noised_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_fn(noised_ids, batch.attention_mask)[:, batch.prompt_length :]
    with torch.no_grad():
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return token_log_probs(logits, batch.completion_ids), entropy


@dataclass
class OneStepMaskedPrompt:
    """d1 (diffu-GRPO): one forward with the whole completion masked and each real prompt token masked with
    probability ``p_mask_prompt``; the mean-field estimate ``log f(o^k | c̃, M…M)`` for every token, no 1/t.
    A fresh prompt mask per call to ``sample_noise`` (d1 draws one per inner iteration)."""

    mask_token_id: int
    p_mask_prompt: float = 0.15
    name: str = "d1"
    forwards_per_sample: int = 1

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        draw = torch.rand(batch.prompt_ids.shape, generator=generator).to(batch.prompt_ids.device)
        return {"prompt_masked": (draw < self.p_mask_prompt) & batch.prompt_attention.bool()}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        prompt = batch.prompt_ids.masked_fill(noise["prompt_masked"], self.mask_token_id)
        completion = torch.full_like(batch.completion_ids, self.mask_token_id)
        logp, entropy = _score(logits_fn, batch, torch.cat([prompt, completion], dim=1))
        return TokenScores(logp=logp, scored=torch.ones_like(logp, dtype=torch.bool), entropy=entropy)


@dataclass
class RandomRatio:
    """MMaDA's UniGRPO estimator: draw t ~ U(t_min, 1] per row, mask each completion token with probability
    t, keep the prompt visible, and score the masked tokens. Closer to the states the sampler visits than
    d1's all-masked pass, at the same cost of one forward."""

    mask_token_id: int
    t_min: float = 0.1
    name: str = "random_ratio"
    forwards_per_sample: int = 1

    def __post_init__(self):
        if not 0 <= self.t_min < 1:
            raise ValueError(f"t_min must lie in [0, 1), got {self.t_min!r}")

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        rows, length = batch.completion_ids.shape
        t = self.t_min + (1 - self.t_min) * (1 - torch.rand(rows, generator=generator))  # (t_min, 1]
        masked = torch.rand(rows, length, generator=generator) < t[:, None]
        device = batch.completion_ids.device
        return {"t": t.to(device), "completion_masked": masked.to(device)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        masked = noise["completion_masked"]
        completion = batch.completion_ids.masked_fill(masked, self.mask_token_id)
        logp, entropy = _score(logits_fn, batch, torch.cat([batch.prompt_ids, completion], dim=1))
        return TokenScores(logp=logp, scored=masked, entropy=entropy)


ESTIMATORS: dict[str, type] = {"d1": OneStepMaskedPrompt, "random_ratio": RandomRatio}


def make_estimator(name: str, *, mask_token_id: int, **options) -> LikelihoodEstimator:
    """Build a registered estimator by name with its options (e.g. ``p_mask_prompt=0.15``)."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood estimator {name!r}; known: {sorted(ESTIMATORS)}") from None
    return cls(mask_token_id=mask_token_id, **options)
