"""Log-likelihood estimators for diffusion LMs: their own layer, chosen by name.

A dLLM has no exact sequence log-probability, so policy-gradient methods score completion tokens under some
noised input (formulas and worked numbers: ``reference/ALGORITHMS.md``). Every estimator works in two phases
so that the current, old and reference policies can be scored on *identical* noise (ratios and KLs then
compare like with like, and VRPO's antithetic sampling comes for free):

    noise = estimator.sample_noise(batch, generator)        # masks, noise levels: tensors, rows first
    scores = estimator.token_logp(logits_fn, batch, noise)  # TokenScores

``logits_fn(input_ids, attention_mask, *, logits_to_keep=0, clean_ids=None) -> logits`` is the policy's
family-aligned forward (``logits_to_keep=n``: only the last n positions, 0: all). Estimators that noise tokens
at random pass the clean sequence as ``clean_ids``, so that on a block-causal model every noised block is
scored given the clean blocks before it (the block-diffusion likelihood); replays of the sampler's own states
(trajectory, exact_ar) score the state as the sampler saw it. ``scores.logp`` is
a per-token estimate (or, for ELBO estimators, each token's weighted contribution, so that the sum over
``scores.scored`` is the sequence estimate); ``scores.draws`` keeps each forward's raw token log-probs, masks
and weights for algorithms that need them one by one (BGPO's per-sample backward, SPG's EUBO, step losses).

| name | forwards per sample | what it scores |
|---|---|---|
| ``d1`` | 1 | all completion tokens, completion fully masked, prompt tokens masked w.p. p (diffu-GRPO) |
| ``random_ratio`` | 1 | masked completion tokens, t ~ U(t_min, 1] (UniGRPO) |
| ``coupled`` | 3 | every token: a fully masked pass plus a complementary mask pair, 1/t and 1/(1−t) (coupled-GRPO) |
| ``elbo`` | mc_num | stratified Monte-Carlo ELBO, exactly x_j tokens masked, weight L/x_j (LLaDA, VRPO, BGPO) |
| ``elbo_pair`` | 2·mc_num | ESPO's ELBO: k/(L+1) masked and its complement, stratified across rows |
| ``block`` | num_t | SPG's clean prefix / partly masked block / masked suffix |
| ``quadrature`` | points | GDPO's semi-deterministic ELBO: t at the Gauss–Legendre nodes of [0, 1], one random mask at each, weight w_n/t_n |
| ``trajectory`` | steps (÷ shrink) | the rollout's own denoising states, each token at the step that committed it (CJ-GRPO, TraceRL) |
| ``exact_ar`` | L | exact left-to-right factorisation, one token per forward (JustGRPO) |
| ``uniform_corruption`` | 1 | uniform-noise models (DiffusionGemma): completion corrupted with uniform tokens at t ~ U, clean tokens scored (:mod:`dare_gym.core.uniform_estimators`) |
| ``uniform_trajectory`` | steps | uniform-noise models: the DiffusionGemma sampler's recorded canvases replayed, each token at its acceptance step |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from dare_gym.core.device import uniform
from dare_gym.core.logprobs import token_entropy, token_log_probs
from dare_gym.registries import Registry

LogitsFn = Callable[..., torch.Tensor]
"""``logits_fn(input_ids, attention_mask, *, logits_to_keep=0, clean_ids=None) -> logits`` aligned so that
position i predicts token i; ``logits_to_keep=n`` returns only the last n positions; ``clean_ids`` is the clean
sequence a randomly noised input was made from (:meth:`DiffusionPolicy.logits`)."""


@dataclass
class Draw:
    """One forward pass of an estimator."""

    logp: torch.Tensor  # [B, L] log f(o^k | this draw's noised input), every completion position
    masked: torch.Tensor  # [B, L] bool: the positions this draw scores (masked in its input, or its targets)
    weight: torch.Tensor  # [B] the draw's importance weight (1/t, L/x_j, ...; 1 where none)


@dataclass
class TokenScores:
    logp: torch.Tensor  # [B, L] the per-token estimate (or weighted contribution, for ELBO estimators)
    scored: torch.Tensor  # [B, L] bool: the positions this estimate covers
    entropy: torch.Tensor | None = None  # [B, L] detached predictive entropy (for logs)
    draws: list[Draw] = field(default_factory=list)

    def sequence(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B] the sequence-level estimate: the sum of the scored per-token terms (within ``mask``)."""
        keep = self.scored if mask is None else self.scored & mask.bool()
        return (self.logp * keep).sum(dim=1)


class LikelihoodEstimator(Protocol):
    name: str
    forwards_per_sample: int | None  # None where it depends on the rollout (trajectory replay)

    def sample_noise(self, batch, generator: torch.Generator | None) -> dict[str, torch.Tensor]: ...

    def token_logp(self, logits_fn: LogitsFn, batch, noise: dict[str, torch.Tensor]) -> TokenScores: ...


ESTIMATORS: Registry = Registry("likelihood estimator")


def register_estimator(name: str):
    """Class decorator: ``@register_estimator("elbo")``; algorithms choose an estimator by this name."""
    return ESTIMATORS.decorator(name)


# ----------------------------------------------------------------------------------------------- helpers


def _forward(logits_fn: LogitsFn, batch, completion: torch.Tensor, prompt: torch.Tensor | None = None):
    """Token log-probs of the clean completion given a randomly noised completion (and optionally noised
    prompt). The clean sequence goes along (``clean_ids``), so a block-causal policy scores each noised block
    given the clean blocks before it (:meth:`DiffusionPolicy.logits`). Only the completion's positions pay for
    the vocabulary-wide head (``logits_to_keep``)."""
    prompt = batch.prompt_ids if prompt is None else prompt
    logits = logits_fn(torch.cat([prompt, completion], dim=1), batch.attention_mask,
                       logits_to_keep=completion.shape[1], clean_ids=batch.input_ids)
    return token_log_probs(logits, batch.completion_ids), token_entropy(logits)


def _state_forward(logits_fn: LogitsFn, batch, completion: torch.Tensor):
    """Token log-probs of the clean completion in a denoising *state* (committed tokens revealed, the rest
    masked): the input is exactly what the sampler saw, so it is scored as it is, with no clean copy (a
    block-diffusion sampler's states have every earlier block clean already)."""
    logits = logits_fn(torch.cat([batch.prompt_ids, completion], dim=1), batch.attention_mask,
                       logits_to_keep=completion.shape[1])
    return token_log_probs(logits, batch.completion_ids), token_entropy(logits)


def _present(batch) -> torch.Tensor:
    """[B, L] completion positions that exist (a shorter row's right padding does not)."""
    return batch.attention_mask[:, batch.prompt_length :].bool()


def _uniform(shape, generator, device) -> torch.Tensor:
    return uniform(shape, generator, device)


def _mask_exactly(counts: torch.Tensor, allowed: torch.Tensor, generator) -> torch.Tensor:
    """[..., L] bool with exactly ``counts[...]`` positions of ``allowed[...]`` chosen uniformly at random (one
    draw per leading index: rows, or rows × quadrature nodes)."""
    keys = _uniform(allowed.shape, generator, allowed.device).masked_fill(~allowed, 2.0)
    ranks = keys.argsort(dim=-1).argsort(dim=-1)
    return (ranks < counts[..., None]) & allowed


def _ones(batch) -> torch.Tensor:
    return torch.ones(batch.completion_ids.shape[0], device=batch.completion_ids.device)


# --------------------------------------------------------------------------------------- one forward


@register_estimator("d1")
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
        draw = _uniform(batch.prompt_ids.shape, generator, batch.prompt_ids.device)
        return {"prompt_masked": (draw < self.p_mask_prompt) & batch.prompt_attention.bool()}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        prompt = batch.prompt_ids.masked_fill(noise["prompt_masked"], self.mask_token_id)
        completion = torch.full_like(batch.completion_ids, self.mask_token_id)
        logp, entropy = _forward(logits_fn, batch, completion, prompt)
        scored = _present(batch)
        return TokenScores(logp, scored, entropy, [Draw(logp, scored, _ones(batch))])


@register_estimator("random_ratio")
@dataclass
class RandomRatio:
    """MMaDA's UniGRPO estimator: draw t ~ U(t_min, 1] per row, mask each completion token with probability
    t, keep the prompt visible, and score the masked tokens."""

    mask_token_id: int
    t_min: float = 0.1
    name: str = "random_ratio"
    forwards_per_sample: int = 1

    def __post_init__(self):
        if not 0 <= self.t_min < 1:
            raise ValueError(f"t_min must lie in [0, 1), got {self.t_min!r}")

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        rows, length = batch.completion_ids.shape
        device = batch.completion_ids.device
        t = self.t_min + (1 - self.t_min) * (1 - _uniform(rows, generator, device))  # (t_min, 1]
        return {"t": t, "completion_masked": (_uniform((rows, length), generator, device) < t[:, None]) & _present(batch)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        masked = noise["completion_masked"]
        logp, entropy = _forward(logits_fn, batch, batch.completion_ids.masked_fill(masked, self.mask_token_id))
        return TokenScores(logp, masked, entropy, [Draw(logp, masked, _ones(batch))])


# ----------------------------------------------------------------------------------- several forwards


@register_estimator("coupled")
@dataclass
class CoupledComplementary:
    """coupled-GRPO (DiffuCoder): three passes on the same completion: fully masked (p0), the tokens with
    u_k < t masked, and the complement. Each token is scored exactly once by the pair:

        ℓ̂^k = ½ [ ℓ₀^k + (1[k∈𝓜] ℓ₁^k / t + 1[k∉𝓜] ℓ₂^k / (1 − t)) ]

    as in the released code (which averages in p0 and weights log-probs, so ℓ̂ is a scaled score rather than a
    log-probability; ratios are between identical masks, so the scale cancels). One t ~ U(t_low, t_high) per
    call, shared by the batch; the prompt is never masked."""

    mask_token_id: int
    t_low: float = 0.2
    t_high: float = 0.8
    name: str = "coupled"
    forwards_per_sample: int = 3

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        rows, length = batch.completion_ids.shape
        device = batch.completion_ids.device
        t = self.t_low + (self.t_high - self.t_low) * _uniform(1, generator, "cpu").item()
        return {"t": torch.full((rows,), t, device=device),
                "first_masked": _uniform((rows, length), generator, device) < t}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        first, t = noise["first_masked"], noise["t"][:, None]
        present = _present(batch)
        all_masked, entropy = _forward(logits_fn, batch, torch.full_like(batch.completion_ids, self.mask_token_id))
        pass_one, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(first, self.mask_token_id))
        pass_two, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(~first, self.mask_token_id))
        pair = torch.where(first, pass_one / t, pass_two / (1 - t))
        logp = 0.5 * (all_masked + pair)
        draws = [Draw(all_masked, present, _ones(batch)), Draw(pass_one, first & present, 1 / t.squeeze(1)),
                 Draw(pass_two, ~first & present, 1 / (1 - t.squeeze(1)))]
        return TokenScores(logp, present, entropy, draws)


def stratified_mask_counts(length: torch.Tensor, draws: int, generator=None) -> torch.Tensor:
    """LLaDA's stratified counts: one k ~ U{1..L} per row, then x_j = round(k + j·L/n) wrapped into 1..L.
    ``length`` is [B]; returns [B, n]. Example: L = 4, n = 2, k = 1 gives (1, 3)."""
    length = length.long().clamp(min=1)
    k = (_uniform(length.shape, generator, length.device) * length).long() + 1
    offsets = torch.arange(draws, device=length.device)[None, :] * length[:, None].double() / draws
    # Round half up, not half to even (torch.round): k + round(j·L/n) must be the same shift of k for every k,
    # or x_j is not uniform on 1..L where j·L/n ends in .5 and the draw's 1/x_j weight is biased.
    counts = torch.floor(k[:, None].double() + offsets + 0.5).long()
    return (counts - 1) % length[:, None] + 1


@register_estimator("elbo")
@dataclass
class StratifiedELBO:
    """The masked-diffusion ELBO by stratified Monte Carlo (LLaDA's ``get_log_likelihood``): ``mc_num`` draws,
    draw j masking exactly x_j of the L completion tokens (stratified counts), weighted L/x_j:

        𝓑 = (1/n) Σ_j (L/x_j) Σ_{k masked in j} log f(o^k | x_j)

    L counts every completion position, EOS padding included (LLaDA and DARE score the padded answer).
    ``scores.logp`` holds each token's share of 𝓑; ``scores.draws`` each draw for per-sample updates. Noise
    drawn once serves the policy and the reference alike (VRPO's antithetic sampling)."""

    mask_token_id: int
    mc_num: int = 4
    name: str = "elbo"

    def __post_init__(self):
        if self.mc_num < 1:
            raise ValueError(f"mc_num must be >= 1, got {self.mc_num!r}")

    @property
    def forwards_per_sample(self) -> int:
        return self.mc_num

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        present = _present(batch)
        counts = stratified_mask_counts(present.sum(dim=1), self.mc_num, generator)
        masks = torch.stack([_mask_exactly(counts[:, j], present, generator) for j in range(self.mc_num)], dim=1)
        return {"masked": masks, "counts": counts}  # [B, n, L], [B, n]

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        draws = [self.draw(logits_fn, batch, noise, j) for j in range(self.mc_num)]
        return _combine(draws, batch)

    def draw(self, logits_fn: LogitsFn, batch, noise, j: int) -> Draw:
        """Draw ``j`` alone: one forward (BGPO calls backward after each)."""
        masked = noise["masked"][:, j]
        logp, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(masked, self.mask_token_id))
        length = _present(batch).sum(dim=1).clamp(min=1).to(logp.dtype)
        return Draw(logp, masked, length / noise["counts"][:, j].to(logp.dtype))


def _combine(draws: list[Draw], batch) -> TokenScores:
    """Average of the draws' weighted contributions, per token."""
    logp = sum((d.logp * d.masked * d.weight[:, None]) for d in draws) / len(draws)
    scored = torch.stack([d.masked for d in draws]).any(dim=0)
    return TokenScores(logp, scored, None, draws)


def gauss_legendre(points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``points``-node Gauss–Legendre rule on [0, 1] (float64): nodes t_n and weights w_n with Σ w_n = 1, from
    the eigen-decomposition of the Legendre polynomials' Jacobi matrix (Golub–Welsch). 2 points: t = ½ ∓ ½/√3,
    w = ½ each."""
    if points == 1:  # the midpoint rule (the Jacobi matrix below would be empty)
        return torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    k = torch.arange(1, points, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    roots, vectors = torch.linalg.eigh(jacobi)
    return (roots + 1) / 2, vectors[0].square()  # mapped from [-1, 1]; the weights 2·v₀² halved


@register_estimator("quadrature")
@dataclass
class QuadratureELBO:
    """GDPO's semi-deterministic Monte-Carlo ELBO: the integral over the noise level t is taken by a ``points``-node
    Gauss–Legendre rule (deterministic), the mask at each node by one random draw (the prompt kept):

        𝓑 = Σ_n w_n · (1/t_n) Σ_{k masked at t_n} log f(o^k | x_{t_n})

    As GDPO's official ``NumericalIntegrationEstimator`` draws it, node n masks exactly ⌊t_n · L⌋ of the row's L
    completion positions, chosen uniformly without replacement (at least one, as NVIDIA NeMo RL's GDPO estimator
    keeps it: the official floor leaves a short completion's first node empty), and weighs them by the nominal
    1/t_n. Most of the ELBO's variance comes from t (the paper's decomposition), which the rule removes.
    ``scores.logp`` holds each token's share of 𝓑; ``scores.draws`` one draw per node, weight w_n/t_n."""

    mask_token_id: int
    points: int = 3
    name: str = "quadrature"

    def __post_init__(self):
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 1:
            raise ValueError(f"points must be an integer >= 1, got {self.points!r}")

    @property
    def forwards_per_sample(self) -> int:
        return self.points

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        rows, length = batch.completion_ids.shape
        device = batch.completion_ids.device
        nodes, _ = gauss_legendre(self.points)
        present = _present(batch)
        size = present.sum(dim=1, keepdim=True)  # [rows, 1] L of each row
        counts = torch.minimum(torch.floor(nodes.to(device)[None, :] * size).long().clamp(min=1), size)  # [rows, n]
        return {"masked": _mask_exactly(counts, present[:, None, :].expand(rows, self.points, length), generator)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        nodes, weights = gauss_legendre(self.points)
        draws = []
        for n in range(self.points):
            masked = noise["masked"][:, n]
            logp, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(masked, self.mask_token_id))
            weight = torch.full((logp.shape[0],), float(weights[n] / nodes[n]), dtype=logp.dtype, device=logp.device)
            draws.append(Draw(logp, masked, weight))
        logp = sum(d.logp * d.masked * d.weight[:, None] for d in draws)  # Σ_n w_n/t_n · (the node's masked terms)
        return TokenScores(logp, torch.stack([d.masked for d in draws]).any(dim=0), None, draws)


@register_estimator("elbo_pair")
@dataclass
class PairedELBO:
    """ESPO's sequence ELBO: k₀ ~ U{0..L} once per call, row j masks k_j = round(k₀ + j(L+1)/B) mod (L+1)
    tokens (stratified *across the batch*), p = k/(L+1), and a second forward scores the complement:

        𝓑 = −½ [ Σ_masked CE / p + Σ_complement CE′ / (L/(L+1) − p) ]

    ``mc_num`` such pairs are averaged. L is the padded completion length."""

    mask_token_id: int
    mc_num: int = 2
    name: str = "elbo_pair"

    @property
    def forwards_per_sample(self) -> int:
        return 2 * self.mc_num

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        present = _present(batch)
        rows = present.shape[0]
        length = present.sum(dim=1)
        masks, counts = [], []
        for _ in range(self.mc_num):
            # One uniform per call, so k₀ ~ U{0..L_row} in every row (rows of equal length share k₀), and
            # round half up, so k_j is the same shift of k₀ whatever k₀ is: each row's k is uniform on 0..L_row.
            u = _uniform(1, generator, length.device)
            k0 = (u * (length + 1)).long().clamp(max=length)
            j = torch.arange(rows, device=length.device)
            k = torch.floor(k0 + j * (length + 1).double() / rows + 0.5).long() % (length + 1)
            masks.append(_mask_exactly(k, present, generator))
            counts.append(k)
        return {"masked": torch.stack(masks, dim=1), "counts": torch.stack(counts, dim=1)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        present = _present(batch)
        length = present.sum(dim=1).to(torch.float32)
        draws = []
        for j in range(self.mc_num):
            masked = noise["masked"][:, j]
            p = noise["counts"][:, j].to(torch.float32) / (length + 1)
            first, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(masked, self.mask_token_id))
            second, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(~masked & present, self.mask_token_id))
            # ½ [ Σ_masked ℓ/p + Σ_complement ℓ′/(L/(L+1) − p) ]; where p = 0 nothing is masked in the first pass.
            first_weight = torch.where(p > 0, 1 / p.clamp(min=1e-12), torch.zeros_like(p))
            second_weight = 1 / (length / (length + 1) - p).clamp(min=1e-12)
            draws.append(Draw(first, masked, 0.5 * first_weight))
            draws.append(Draw(second, ~masked & present, 0.5 * second_weight))
        logp = sum(d.logp * d.masked * d.weight[:, None] for d in draws) / self.mc_num
        return TokenScores(logp, present, None, draws)


@register_estimator("block")
@dataclass
class BlockwiseMask:
    """SPG's block-wise masking ("block_random"): pick a block m of the completion; blocks before it stay
    clean, blocks after it are fully masked, and inside it a uniform count in [max(1, ⌊n_m·t_min⌋),
    ⌊n_m·t_max⌋] is masked; positions past the EOS are masked too. With ``p_mask_clean`` > 0 the tokens
    *before* block m (the prompt's and the clean earlier blocks') are then masked with that probability (SPG's
    ``use_mask_prompt``): the official trainer and DARE draw these extra masks outside the region from block m
    on, so block m's unselected tokens stay visible. ``num_t`` draws, one forward each; each draw scores its
    masked valid tokens (the extra masks in the earlier blocks included, as SPG scores every masked token)."""

    mask_token_id: int
    block_length: int = 32
    num_t: int = 2
    t_min: float = 0.0
    t_max: float = 1.0
    p_mask_clean: float = 0.15
    name: str = "block"

    @property
    def forwards_per_sample(self) -> int:
        return self.num_t

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        rows, length = batch.completion_ids.shape
        device = batch.completion_ids.device
        valid = batch.completion_mask.bool()
        position = torch.arange(length, device=device)[None, :]
        completion_masks, prompt_masks = [], []
        for _ in range(self.num_t):
            valid_length = valid.sum(dim=1).clamp(min=1)
            blocks = (valid_length + self.block_length - 1) // self.block_length
            m = (_uniform(rows, generator, device) * blocks).long()
            start = m * self.block_length
            size = torch.minimum(torch.full_like(start, self.block_length), valid_length - start).clamp(min=1)
            low = torch.clamp((size.double() * self.t_min).floor().long(), min=1)
            high = torch.maximum((size.double() * self.t_max).floor().long(), low)
            count = low + (_uniform(rows, generator, device) * (high - low + 1)).long().clamp(max=(high - low))
            in_block = (position >= start[:, None]) & (position < (start + size)[:, None])
            masked = _mask_exactly(count, in_block, generator) | (position >= (start + size)[:, None])
            before_block = (position < start[:, None]) & _present(batch)
            masked |= before_block & (_uniform((rows, length), generator, device) < self.p_mask_clean)
            completion_masks.append(masked & _present(batch))
            prompt_masks.append((_uniform(batch.prompt_ids.shape, generator, device) < self.p_mask_clean)
                                & batch.prompt_attention.bool())
        return {"masked": torch.stack(completion_masks, dim=1), "prompt_masked": torch.stack(prompt_masks, dim=1)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        valid = batch.completion_mask.bool()
        draws = []
        for j in range(self.num_t):
            masked = noise["masked"][:, j]
            prompt = batch.prompt_ids.masked_fill(noise["prompt_masked"][:, j], self.mask_token_id)
            logp, _ = _forward(logits_fn, batch, batch.completion_ids.masked_fill(masked, self.mask_token_id), prompt)
            draws.append(Draw(logp, masked & valid, _ones(batch)))
        logp = sum(d.logp * d.masked for d in draws) / self.num_t
        return TokenScores(logp, torch.stack([d.masked for d in draws]).any(dim=0), None, draws)


# ------------------------------------------------------------------------------------- trajectories


def shrink_steps(unmask_step: torch.Tensor, shrink: int) -> torch.Tensor:
    """TraceRL's step shrinkage: per row, group every ``shrink`` consecutive distinct step ids and relabel
    them with the group's index (ranked from 0). [0, 1, 2, 3] with shrink 2 -> groups [0, 0, 1, 1]."""
    groups = torch.full_like(unmask_step, -1)
    for row in range(unmask_step.shape[0]):
        steps = unmask_step[row]
        distinct = torch.unique(steps[steps >= 0])  # sorted
        rank = torch.searchsorted(distinct, steps.clamp(min=0))
        groups[row] = torch.where(steps >= 0, rank // shrink, -1)
    return groups


@register_estimator("trajectory")
@dataclass
class TrajectoryReplay:
    """Replay the rollout's own denoising trajectory (CJ-GRPO; TraceRL with ``shrink`` > 1). The state before
    step group g has every token committed in earlier groups revealed and the rest masked; the forward on it
    scores the tokens committed in group g. Each token is scored exactly once, in the state the sampler saw
    when it committed it. States are rebuilt from ``unmask_step``, so nothing but that is stored.

    ``order="left_to_right"`` replaces the sampler's order by the exact autoregressive one (one token per
    forward, every padded position: JustGRPO)."""

    mask_token_id: int
    shrink: int = 1
    order: str = "sampler"
    name: str = "trajectory"

    def __post_init__(self):
        if self.order not in ("sampler", "left_to_right"):
            raise ValueError(f"order must be 'sampler' or 'left_to_right', got {self.order!r}")
        if self.shrink < 1:
            raise ValueError(f"shrink must be >= 1, got {self.shrink!r}")

    forwards_per_sample = None  # one per step group: the sampler's steps / shrink, or L left to right
    deterministic = True  # no random noise: every inner iteration replays the same states

    @property
    def scores_commit_states(self) -> bool:
        """Each token is scored in the state the sampler committed it in (not left to right, no shrinkage), so its
        log-prob compares with the sampler's own."""
        return self.order == "sampler" and self.shrink == 1

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        present = _present(batch)
        if self.order == "left_to_right":
            position = torch.arange(present.shape[1], device=present.device).expand_as(present)
            return {"step_group": torch.where(present, position, -1)}
        if batch.unmask_step is None:
            raise ValueError("trajectory replay needs the rollout's unmask_step; this batch has none")
        return {"step_group": shrink_steps(batch.unmask_step.masked_fill(~present, -1), self.shrink)}

    def token_logp(self, logits_fn: LogitsFn, batch, noise) -> TokenScores:
        group = noise["step_group"]
        logp = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        entropy = torch.zeros_like(logp)
        draws = []
        for g in range(int(group.max()) + 1):
            targets = group == g
            if not targets.any():
                continue
            state = batch.completion_ids.masked_fill(group >= g, self.mask_token_id)
            step_logp, step_entropy = _state_forward(logits_fn, batch, state)
            logp = torch.where(targets, step_logp, logp)
            entropy = torch.where(targets, step_entropy, entropy)
            draws.append(Draw(step_logp, targets, _ones(batch)))
        return TokenScores(logp, group >= 0, entropy, draws)


def make_estimator(name: str, *, mask_token_id: int, **options) -> LikelihoodEstimator:
    """Build a registered estimator by name with its options (e.g. ``p_mask_prompt=0.15``). For a model of a
    given noise (a uniform-noise family), :func:`dare_gym.core.uniform_estimators.make_noise_estimator`."""
    cls = ESTIMATORS.lookup(name)
    options = {**getattr(cls, "fixed_options", {}), **options}
    try:
        return cls(mask_token_id=mask_token_id, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options!r} for estimator {name!r}: {error}") from None


@register_estimator("exact_ar")
class ExactLeftToRight(TrajectoryReplay):
    """JustGRPO's exact likelihood: trajectory replay in left-to-right order, one token per forward."""

    fixed_options = {"order": "left_to_right"}


# The uniform-noise estimators (dare_gym.core.uniform_estimators, built on this module's Draw and TokenScores) add
# themselves to ESTIMATORS when that module is imported (the algorithms import it).
