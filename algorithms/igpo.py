"""IGPO (inpainting-guided policy optimisation; Zhao et al., 2025, arXiv 2509.10396).

Followed: the official code (facebookresearch/igpo at e85eaea: ``trainer_igpo.py``'s
``_generate_and_score_completions`` and ``compute_loss``, ``utils/generate.py``'s
``create_spacing_scaled_inpainting_sequence``, ``scale_chunk_positions`` and ``generate_inpainting``) with the
recipe of its ``run_igpo.sh``; the paper describes the same method.

When every completion of a group is wrong, GRPO has no signal for that prompt. A dLLM can *inpaint*: IGPO
regenerates the group with pieces of the gold reasoning written into the completion, and keeps the ones that
come out correct:

  1. sample G completions per prompt; the env judges them (``is_correct``);
  2. for each group with no correct completion whose env offers a hint (the whole reference reasoning,
     :meth:`TextTaskEnv.hint` with fraction 1), draw G inpainting ratios η ~ U[η_low, η_high] (sorted) and
     regenerate the G rows with a prefill (:func:`inpainting_prefill`): the reasoning's tokens (at most
     ``gen_length − free_tail``) cut into chunks of ``min_chunk_size``–``max_chunk_size`` tokens (a shorter
     tail is dropped), a random ⌊(1 − η)·n_chunks⌋ of them hidden and the others, always the last, written at
     their positions stretched by s = clamp((gen_length − free_tail) / n_tokens, 1, ``max_stretch``) with
     each gap capped at ``max_spacing``; the sampler fills the rest and never remasks the hint;
  3. up to ``max_replacements`` of the regenerated rows that came out correct (a random subset when more did)
     replace the group's first rows, with their hint positions recorded;
  4. advantages A = r − mean_group(r) (no std), and the loss of d1 with the whole completion masked (no prompt
     masking), with the official GSPO ratio: s_i = exp((1/L) Σ_t (log π_θ − log π_old)) over all L completion
     positions, the gradient through that mean, and per token
         ℓ_it = −min(s_i A_i, clip(s_i, 1 − ε, 1 + ε_high) A_i) + β·k3_it,
     averaged over the scored tokens of the minibatch. Hinted tokens stay in the loss, but of each row's hinted
     tokens only the ``hint_entropy_keep`` fraction (at least one) with the highest entropy under π_old on that
     iteration's noise are scored; generated tokens are all scored (``entropy_clipping_ratio_inpaint``).

Defaults (``run_igpo.sh``): η ~ U[0.2, 0.6], 4 replacements, chunks of 5–10 tokens, the last 30 positions left
free, stretch ≤ 1.5, gaps ≤ 100, entropy keep 0.2; ε = ε_high = 0.2, β = 0.01, μ = 4, sequence ratio (``use_gspo``),
d1 masking; run settings: lr 5e-7, G = 8, temperature 1.2, block 32, steps = gen_length / 2.
Deviations: the entropy is computed for μ = 1 too (the official code defines it only for μ > 1), and a task
without hints (``hint`` None) trains as plain GRPO.

Neighbours: d1's loss and estimator with GSPO's ratio; what differs is the rollout, which turns all-wrong groups
into groups with signal (a guided, off-policy exploration step), and the entropy filter on hinted tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dare_gym.algorithms.base import (
    NOISE_PREFIX,
    AlgorithmConfig,
    PolicyGradient,
    Rollout,
    masked_mean,
    register_algorithm,
)
from dare_gym.algorithms.options import (
    Clip,
    ClipHigher,
    GroupAdvantages,
    KLPenalty,
    Likelihood,
    ResponseMask,
    SequenceRatio,
    is_number,
)
from dare_gym.core.device import uniform
from dare_gym.core.losses import kl_penalty

HINTED = "igpo.hinted"  # buffer column [N, L] bool: the completion positions the rollout's prefill fixed
SCORED = "igpo.scored"  # buffer column [N, μ, L] bool: the positions each iteration's loss scores


@dataclass
class IGPOConfig(ResponseMask, Likelihood, SequenceRatio, GroupAdvantages, KLPenalty, ClipHigher, Clip,
                 AlgorithmConfig):
    num_iterations: int = 4
    epsilon: float = 0.2
    epsilon_high: float | None = 0.2
    beta: float = 0.01
    scale_rewards: str = "none"
    estimator: str = "d1"
    estimator_kwargs: dict = field(default_factory=lambda: {"p_mask_prompt": 0.0})
    """d1 masking: the completion fully masked, the prompt never (``d1_masking``, ``p_mask_prompt: 0``)"""
    importance_sampling_level: str = "sequence"
    """sequence: the official GSPO ratio exp(mean over the completion of log π_θ − log π_old); token: GRPO's"""
    response_mask: str = "all"
    inpaint_ratio_low: float = 0.2
    """η_low: each regenerated row reveals a fraction η ~ U[η_low, η_high] of the hint's chunks"""
    inpaint_ratio_high: float = 0.6
    """η_high (the official ``inpaint_chunk_high_initial_ratio``)"""
    max_replacements: int = 4
    """at most this many correct inpainted rows replace rows of an all-wrong group"""
    min_chunk_size: int = 5
    """hint chunks are min_chunk_size to max_chunk_size tokens; a shorter remainder is dropped"""
    max_chunk_size: int = 10
    """the largest hint chunk, in tokens"""
    free_tail: int = 30
    """the last free_tail completion positions are never inpainted"""
    max_stretch: float = 1.5
    """the hint's spacing is stretched by up to this factor to fill the completion"""
    max_spacing: int = 100
    """cap on each (stretched) gap between revealed chunks"""
    hint_entropy_keep: float = 0.2
    """of each row's hinted tokens, the loss scores this fraction with the highest entropy (at least one)"""

    def check(self):
        for name in ("inpaint_ratio_low", "inpaint_ratio_high", "hint_entropy_keep"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.inpaint_ratio_low > self.inpaint_ratio_high:
            raise ValueError(f"inpaint_ratio_low ({self.inpaint_ratio_low}) must not exceed inpaint_ratio_high "
                             f"({self.inpaint_ratio_high})")
        for name in ("max_replacements", "min_chunk_size", "max_chunk_size", "free_tail", "max_spacing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if "chunk" in name else 0):
                raise ValueError(f"{name} must be an integer >= {1 if 'chunk' in name else 0}, got {value!r}")
        if self.min_chunk_size > self.max_chunk_size:
            raise ValueError(f"min_chunk_size ({self.min_chunk_size}) must not exceed max_chunk_size "
                             f"({self.max_chunk_size})")
        if not (is_number(self.max_stretch) and self.max_stretch >= 1):
            raise ValueError(f"max_stretch must be a number >= 1, got {self.max_stretch!r}")


# ------------------------------------------------------------------------------------------- inpainting


def hint_chunks(length: int, min_size: int, max_size: int, rng: random.Random) -> list[tuple[int, int]]:
    """The hint's tokens [0, length) cut left to right into chunks of min_size..max_size tokens; a remainder
    shorter than min_size is dropped (too short to inpaint around)."""
    chunks, start = [], 0
    while start < length:
        size = min(rng.randint(min_size, max_size), length - start)
        if size < min_size:
            break
        chunks.append((start, start + size))
        start += size
    return chunks


def stretched_positions(chunks: list[tuple[int, int]], stretch: float, max_spacing: int,
                        room: int) -> list[tuple[int, int]]:
    """Where each revealed chunk goes in the completion: the first at ⌊start·stretch⌋, each next one after the
    previous one's end by its original gap stretched (⌊gap·stretch⌋, at most ``max_spacing``); a chunk running
    past ``room`` is cut there, and chunks starting past it are dropped."""
    placed = []
    for index, (start, end) in enumerate(chunks):
        if index == 0:
            first = int(start * stretch)
        else:
            first = placed[-1][1] + min(int((start - chunks[index - 1][1]) * stretch), max_spacing)
        last = first + (end - start)
        if last > room:
            if room - first <= 0:
                break
            last = room
        placed.append((first, last))
    return placed


def inpainting_prefill(hint_ids: Sequence[int], ratio: float, gen_length: int, mask_id: int,
                       config: IGPOConfig, rng: random.Random) -> torch.Tensor:
    """[gen_length] prefill (the mask id where the sampler generates) revealing about ``ratio`` of the hint's
    chunks at stretched positions (the module docstring's step 2)."""
    prefill = torch.full((gen_length,), mask_id, dtype=torch.long)
    room = max(0, gen_length - config.free_tail)
    if not hint_ids or room == 0:
        return prefill
    stretch = min(config.max_stretch, max(1.0, room / len(hint_ids)))
    tokens = list(hint_ids)[:room]
    chunks = hint_chunks(len(tokens), config.min_chunk_size, config.max_chunk_size, rng)
    hidden = set(rng.sample(chunks, int(len(chunks) * (1 - ratio)))) if chunks else set()
    revealed = [chunk for index, chunk in enumerate(chunks) if chunk not in hidden or index == len(chunks) - 1]
    for (start, _), (first, last) in zip(revealed, stretched_positions(revealed, stretch, config.max_spacing, room)):
        prefill[first:last] = torch.tensor(tokens[start:start + last - first])
    return prefill


@dataclass
class InpaintedRollout(Rollout):
    """The rollout with each row's hinted positions, kept as a buffer column."""

    hinted: list[torch.Tensor] = field(default_factory=list)  # [gen_length] bool per completion

    def buffer(self, rewards, group_ids, correct=None):
        buffer = super().buffer(rewards, group_ids, correct)
        width = buffer.completion_ids.shape[1]
        hinted = torch.zeros(len(buffer), width, dtype=torch.bool)
        for row, mask in enumerate(self.hinted):
            hinted[row, :len(mask)] = mask[:width]
        buffer.columns[HINTED] = hinted
        return buffer


# ---------------------------------------------------------------------------------------------- the method


@register_algorithm("igpo", IGPOConfig)
class IGPO(PolicyGradient):

    def rollout(self, policy, prompts, *, group_size, generator, batch_size, settings, context=None):
        prompts = list(prompts)
        completions = policy.generate(prompts, generator=generator, batch_size=batch_size, **settings)
        hinted = [torch.zeros(len(c.completion_ids), dtype=torch.bool) for c in completions]
        rollout = InpaintedRollout(prompts, completions, policy, self.response_mask, hinted=hinted)
        self.inpainted_groups = self.replaced_rows = 0  # this step's counts (the rollout test reads them)
        if context is None or context.hints is None or context.judge is None or self.config.max_replacements == 0:
            return rollout  # no env to ask for hints or verdicts, or nothing may be replaced: plain GRPO
        self.inpaint_failed_groups(rollout, policy, group_size, generator, batch_size, settings, context)
        return rollout

    def inpaint_failed_groups(self, rollout, policy, group_size, generator, batch_size, settings, context) -> None:
        """Steps 1–3: regenerate every all-wrong group that has a hint with inpainted prefills, and replace up to
        ``max_replacements`` of its rows by the inpainted rows that came out correct (in place)."""
        config, completions = self.config, rollout.completions
        # the chunk and ratio draws, seeded from the run's generator (drawn where it lives: CPU or GPU)
        rng = random.Random(int(uniform((1,), generator, "cpu", torch.float64)[0] * 2**53))
        gen_length = len(completions[0].completion_ids)
        regenerate, prefills = [], []  # the groups to inpaint (their first row) and their rows' prefills
        for first in range(0, len(completions), group_size):
            index = context.indices[first]
            verdicts = context.judge(index, [c.text for c in completions[first:first + group_size]])
            hint = context.hints([index], 1.0)[0] if not any(verdicts) else None
            if not hint:
                continue
            hint_ids = policy.tokenizer(hint, add_special_tokens=False)["input_ids"]
            ratios = sorted(rng.uniform(config.inpaint_ratio_low, config.inpaint_ratio_high)
                            for _ in range(group_size))
            group = [inpainting_prefill(hint_ids, ratio, gen_length, policy.mask_token_id, config, rng)
                     for ratio in ratios]
            if all(bool((row == policy.mask_token_id).all()) for row in group):
                continue  # nothing to reveal (no room before the free tail): regenerating would be plain sampling
            regenerate.append(first)
            prefills += group
        self.inpainted_groups = len(regenerate)
        self.replaced_rows = 0
        if not regenerate:
            return
        rows = [first + j for first in regenerate for j in range(group_size)]
        inpainted = policy.generate([rollout.prompts[r] for r in rows], generator=generator, batch_size=batch_size,
                                    prefill=prefills, **settings)
        for number, first in enumerate(regenerate):
            mine = range(number * group_size, (number + 1) * group_size)
            verdicts = context.judge(context.indices[first], [inpainted[k].text for k in mine])
            correct = [k for k, ok in zip(mine, verdicts) if ok]
            if len(correct) > config.max_replacements:
                correct = rng.sample(correct, config.max_replacements)
            for offset, k in enumerate(correct):  # the group's first rows make way
                completions[first + offset] = inpainted[k]
                rollout.hinted[first + offset] = prefills[k] != policy.mask_token_id
                self.replaced_rows += 1

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        """π_old and π_ref on each iteration's noise (the shared pieces), then the positions each iteration
        scores: every generated token, and of each row's hinted tokens the ``hint_entropy_keep`` fraction with
        the highest entropy under π_old on that iteration's noise."""
        super().prepare(policy, reference, buffer, generator, micro_batch_size)
        hinted = buffer.columns.get(HINTED, torch.zeros(buffer.completion_ids.shape, dtype=torch.bool))
        noise = {name: value for name, value in buffer.columns.items() if name.startswith(NOISE_PREFIX)}
        same_noise = all(bool((value == value[:, :1]).all()) for value in noise.values())
        per_iteration = []
        for iteration in range(self.config.num_iterations):
            if iteration > 0 and same_noise:  # d1 masking draws no noise: every iteration scores the same input
                per_iteration.append(per_iteration[0])
                continue
            entropies = []
            for rows in buffer.row_chunks(micro_batch_size):
                part = buffer.select(rows)
                inputs = self.model_inputs(part, policy.device)
                scores = self.estimator.token_logp(policy.logits, inputs, self.noise(part, iteration, policy.device))
                entropies.append(scores.entropy.cpu())
            entropy = torch.cat(entropies)
            per_iteration.append(keep_high_entropy_hints(entropy, hinted, self.config.hint_entropy_keep))
        buffer.columns[SCORED] = torch.stack(per_iteration, dim=1)

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        device = scores.logp.device
        present = inputs.completion_mask.bool() & scores.scored  # every completion position (response_mask all)
        advantages = batch.advantage.to(device)[:, None]
        log_ratio = scores.logp - old_logp
        if config.importance_sampling_level == "sequence":  # the official GSPO: the gradient through the mean
            weights = present.to(log_ratio.dtype)
            log_ratio = ((log_ratio * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))[:, None]
        if config.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
        ratio = log_ratio.exp().expand_as(scores.logp)
        high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        clipped = ratio.clamp(1 - config.epsilon, 1 + high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        scored = batch.columns[SCORED][:, iteration].to(device) & present
        metrics = {"clip_fraction": masked_mean((ratio * advantages > clipped * advantages).float(), scored),
                   "entropy": masked_mean(scores.entropy, scored), "scored_tokens": float(scored.sum())}
        if config.beta > 0 and ref_logp is not None:
            kl = kl_penalty(scores.logp, ref_logp, config.kl_estimator, clamp=config.kl_clamp)
            per_token = per_token + config.beta * kl
            metrics["kl_ref"] = masked_mean(kl.detach(), scored)
        hinted = batch.columns[HINTED].to(device) if HINTED in batch.columns else torch.zeros_like(scored)
        metrics["hinted_rows"] = float(hinted.any(dim=1).sum())
        return (per_token * scored).sum() / scored.sum().clamp(min=1), metrics


def keep_high_entropy_hints(entropy: torch.Tensor, hinted: torch.Tensor, keep: float) -> torch.Tensor:
    """[N, L] bool: every position that is not hinted, and of each row's hinted positions the
    max(1, ⌊keep · n_hinted⌋) with the highest entropy."""
    scored = ~hinted
    for row in range(hinted.shape[0]):
        positions = hinted[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        count = max(1, math.floor(positions.numel() * keep))
        top = entropy[row, positions].topk(count).indices
        scored[row, positions[top]] = True
    return scored
