"""LLaDA's semi-autoregressive sampler with low-confidence remasking (Nie et al., 2025; ``generate.py``).

The completion is split into blocks decoded left to right; inside a block each step predicts every masked
token at once and commits the most confident few, spreading the block's tokens evenly over its steps with the
remainder on the first steps. With ``temperature=0`` and ``remasking="low_confidence"`` this is the
reference ``generate()`` token for token, batched: rows are left-padded prompts followed by ``gen_length``
mask tokens, and the family forward hides pad keys and counts positions over real tokens, so a batched row
computes what it computes alone.

The loop, :func:`denoise_blocks`, is shared with Fast-dLLM (``fast_dllm.py``), which swaps in its cached
forwards and its parallel commit rules; with the defaults here it is LLaDA's algorithm exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from dare_gym.core.device import uniform
from dare_gym.samplers.base import (
    Sampler,
    SamplerOptions,
    SamplerOutput,
    column_scoring,
    fill_after_stop,
    first_stop_done,
    propose,
    suppress_stop_tokens,
    record_step,
    register_sampler,
    build_output,
    check_prefill,
    tempered_probability,
    tokens_per_step,
    top_n,
    update_guess,
    write_prefill,
)

REMASKING_RULES = ("low_confidence", "random")


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Validate the block schedule; returns the number of steps per block."""
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps={steps} must be a multiple of the number of blocks "
            f"(gen_length/block_length = {gen_length}/{block_length} = {num_blocks})"
        )
    return steps // num_blocks


@dataclass
class LLaDAOptions(SamplerOptions):
    steps: int = 64
    """denoising steps in all (a multiple of the number of blocks)"""
    block_length: int = 32
    """tokens per semi-autoregressive block (divides gen_length)"""
    remasking: str = "low_confidence"
    """which masked positions a step commits first: low_confidence (most probable guesses) or random"""

    def __post_init__(self):
        super().__post_init__()
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {self.remasking!r}")
        check_schedule(self.gen_length, self.steps, self.block_length)


# ------------------------------------------------------------------------------------------------ forwards


class FullForward:
    """Every step recomputes the whole sequence (LLaDA); the lm head runs on the wanted columns only."""

    def begin_block(self, start: int, end: int) -> None:
        pass

    def __call__(self, policy, x, attention_mask, wanted: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the columns scored, sorted: here all of ``wanted``; their logits [B, C, V]; query tokens processed)."""
        return wanted, policy.logits(x, attention_mask, logits_to_keep=wanted), x.numel()


# -------------------------------------------------------------------------------------------- commit rules


class ScheduledCommit:
    """LLaDA's rule: step s of a block commits its scheduled count n_s, the most confident first."""

    adaptive = False

    def __call__(self, confidence: torch.Tensor, scheduled: torch.Tensor) -> torch.Tensor:
        return top_n(confidence, scheduled)


# ------------------------------------------------------------------------------------------------ one step


def commit_priority(predicted: torch.Tensor, probability: torch.Tensor, masked: torch.Tensor, remasking: str,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Each candidate's priority to be committed this step: its guess's probability (``low_confidence``) or a
    uniform draw (``random``); ``-inf`` where the position is not masked, so it is never chosen."""
    if remasking == "low_confidence":
        priority = probability
    else:
        priority = uniform(predicted.shape, generator, predicted.device, torch.float64)
    return priority.masked_fill(~masked, float("-inf"))


def write_commits(x: torch.Tensor, unmask_step: torch.Tensor, commit_logp: torch.Tensor, columns: torch.Tensor,
                  chosen: torch.Tensor, predicted: torch.Tensor, logp: torch.Tensor, prompt_length: int,
                  step: int) -> None:
    """Commit the ``chosen`` guesses at ``columns`` of ``x``, in place, and record the step and log-prob of
    those in the completion (``columns`` may include prompt columns when predictions are recorded)."""
    x[:, columns] = torch.where(chosen, predicted, x[:, columns])
    in_completion = columns >= prompt_length
    positions = columns[in_completion] - prompt_length
    chosen = chosen[:, in_completion]
    unmask_step[:, positions] = torch.where(chosen, step, unmask_step[:, positions])
    commit_logp[:, positions] = torch.where(chosen, logp[:, in_completion], commit_logp[:, positions])


# ------------------------------------------------------------------------------------------------- the loop


@torch.no_grad()
def denoise_blocks(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, gen_length: int, steps: int,
                   block_length: int, temperature: float, remasking: str, generator: torch.Generator | None,
                   record_predictions: bool, forward=None, commit=None, early_exit: bool = False,
                   tempered_confidence: bool = False, min_new_tokens: int = 0,
                   prefill: torch.Tensor | None = None) -> SamplerOutput:
    """Decode ``gen_length`` tokens after each left-padded prompt row, block by block.

    ``forward`` computes a step's logits for the columns it is given (:class:`FullForward`, or Fast-dLLM's caches,
    which score only the columns they feed): the columns still masked, or with ``record_predictions`` every
    completion column (a contiguous span, which :func:`update_guess` reads); ``commit`` picks the
    positions a step commits from their confidences (:class:`ScheduledCommit`, or a threshold rule, which
    decodes a block in as many steps as it needs); ``early_exit`` stops once every row has committed a stop
    token with nothing masked before it. ``tempered_confidence`` takes each guess's probability under
    softmax(logits / temperature) instead of LLaDA's softmax(logits) as its confidence, both to commit and to
    record (MDPO's sampler). ``prefill``: completion tokens fixed in advance (:class:`Sampler`), which only
    ever count as committed.
    """
    policy = column_scoring(policy)
    forward = forward or FullForward()
    commit = commit or ScheduledCommit()
    steps_per_block = check_schedule(gen_length, steps, block_length)
    batch, prompt_length = prompt_ids.shape
    device, mask_id = prompt_ids.device, policy.mask_token_id
    check_prefill(prefill, batch, gen_length)
    x = torch.cat([prompt_ids, prompt_ids.new_full((batch, gen_length), mask_id)], dim=1)
    write_prefill(x[:, prompt_length:], prefill, mask_id)  # fixed tokens: never masked, so never candidates
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones((batch, gen_length))], dim=1)
    unmask_step = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    commit_logp = torch.zeros(batch, gen_length, dtype=torch.float32, device=device)
    stop_ids = torch.tensor(policy.stop_token_ids, dtype=torch.long, device=device)
    guess = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=device)  # for record_predictions
    guess_confidence = torch.zeros(batch, gen_length, dtype=torch.float32, device=device)
    predictions, confidences = [], []
    calls = processed = 0

    for block in range(gen_length // block_length):
        start, end = prompt_length + block * block_length, prompt_length + (block + 1) * block_length
        forward.begin_block(start, end)
        schedule = tokens_per_step((x[:, start:end] == mask_id).sum(dim=1), steps_per_block)
        for step in itertools.count():
            if (step >= steps_per_block) if not commit.adaptive else \
                    (step >= block_length or not bool((x[:, start:end] == mask_id).any())):
                break
            # Candidates are all masked positions left of the block's end. Normally that is the current block,
            # but a model can predict the mask token itself, leaving it masked; the reference sampler then
            # revisits it later, and so do we. Only columns some row still has to decode are scored.
            masked = x[:, :end] == mask_id
            needed = masked.any(dim=0).nonzero().squeeze(1)
            if needed.numel() == 0:
                break
            # The lm head runs on the needed columns only; recording predictions wants every completion column.
            wanted = torch.arange(min(int(needed[0]), prompt_length), x.shape[1], device=device) \
                if record_predictions else needed
            scored, logits, tokens = forward(policy, x, attention_mask, wanted, end)
            calls, processed = calls + 1, processed + tokens
            columns = needed[torch.isin(needed, scored)]  # a cached forward scores only the columns it feeds
            masked = masked[:, columns]
            step_logits = logits if scored.numel() == columns.numel() else \
                logits[:, torch.searchsorted(scored, columns)]  # [B, C, V]: the logits that decide this step
            step_logits = suppress_stop_tokens(step_logits, columns - prompt_length, min_new_tokens, stop_ids)
            predicted, probability, logp = propose(step_logits, temperature, generator)
            confidence_temperature = temperature if tempered_confidence else 0.0
            if confidence_temperature > 0:  # MDPO: commit and record by the distribution the guess was drawn from
                probability = tempered_probability(step_logits, predicted, confidence_temperature)
            priority = commit_priority(predicted, probability, masked, remasking, generator)
            chosen = commit(priority, schedule[:, min(step, steps_per_block - 1)]) & masked
            if record_predictions:
                update_guess(guess, guess_confidence, logits, int(scored[0]), prompt_length, confidence_temperature)
                record_step(predictions, confidences, x, guess, guess_confidence, columns, predicted, probability,
                            masked, prompt_length, mask_id)
            write_commits(x, unmask_step, commit_logp, columns, chosen, predicted, logp, prompt_length, calls - 1)
            if early_exit and bool(first_stop_done(x[:, prompt_length:], mask_id, stop_ids).all()):
                fill_after_stop(x[:, prompt_length:], unmask_step, mask_id, int(stop_ids[0]), calls - 1)
                return build_output(x, prompt_length, unmask_step, commit_logp, calls, processed, predictions,
                               confidences)
    return build_output(x, prompt_length, unmask_step, commit_logp, calls, processed, predictions, confidences)


@torch.no_grad()
def continue_denoising(policy, x: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                       unmask_step: torch.Tensor, commit_logp: torch.Tensor, *, first_step: int, last_step: int,
                       steps: int, block_length: int, temperature: float, remasking: str,
                       generator: torch.Generator | None) -> int:
    """Run steps ``first_step .. last_step - 1`` of LLaDA's schedule on partly decoded rows, in place.

    ``x`` is [B, P + L] (left-padded prompts, then completions with the mask token where nothing is committed
    yet); ``unmask_step`` / ``commit_logp`` [B, L] receive the global step and log-prob of each token committed.
    Step ``s`` works on block ``s // (steps / num_blocks)``; the per-step budget is recomputed from the block's
    remaining masks and remaining steps at every block start and at ``first_step`` (the same numbers an
    uninterrupted run uses: the tail of an even split with the remainder first is such a split again). Only
    the current block's masked positions are candidates (d-TreeRPO's tree rollout, ALGORITHMS.md section Q;
    :func:`denoise_blocks` also revisits positions of earlier blocks left masked because the model predicted
    the mask token itself, the only case where the two differ). Run from step 0 to ``steps`` on all-masked
    completions this draws the same noise as :func:`denoise_blocks` and commits the same tokens. Returns the
    number of forwards (a step with nothing left to decode in its block makes none)."""
    gen_length = x.shape[1] - prompt_length
    steps_per_block = check_schedule(gen_length, steps, block_length)
    if not 0 <= first_step <= last_step <= steps:
        raise ValueError(f"need 0 <= first_step <= last_step <= steps={steps}, got {first_step}..{last_step}")
    mask_id, calls = policy.mask_token_id, 0
    schedule, schedule_start = None, first_step
    for step in range(first_step, last_step):
        block, offset = divmod(step, steps_per_block)
        start, end = prompt_length + block * block_length, prompt_length + (block + 1) * block_length
        if offset == 0 or step == first_step:
            remaining = (x[:, start:end] == mask_id).sum(dim=1)
            schedule, schedule_start = tokens_per_step(remaining, steps_per_block - offset), step
        masked = x[:, start:end] == mask_id
        columns = masked.any(dim=0).nonzero().squeeze(1) + start
        if columns.numel() == 0:
            continue
        first = int(columns[0])
        logits = policy.logits(x, attention_mask, logits_to_keep=x.shape[1] - first)
        calls += 1
        masked = masked[:, columns - start]
        predicted, probability, logp = propose(logits[:, columns - first], temperature, generator)
        priority = commit_priority(predicted, probability, masked, remasking, generator)
        chosen = top_n(priority, schedule[:, step - schedule_start]) & masked
        write_commits(x, unmask_step, commit_logp, columns, chosen, predicted, logp, prompt_length, step)
    return calls


@register_sampler("llada")
class LLaDASampler(Sampler):
    """LLaDA's low-confidence (or random) remasking sampler, semi-autoregressive blocks, fixed steps."""

    options_class = LLaDAOptions
    takes_min_new_tokens = True
    accepts_prefill = True

    def left_to_right(self, policy, gen_length: int) -> dict:
        return {"block_length": 1, "steps": gen_length}  # blocks of one token: each step commits the next

    def __call__(self, policy, prompt_ids, prompt_mask, options: LLaDAOptions, *, generator=None,
                 record_predictions=False, prefill=None) -> SamplerOutput:
        return denoise_blocks(policy, prompt_ids, prompt_mask, gen_length=options.gen_length, steps=options.steps,
                              block_length=options.block_length, temperature=options.temperature,
                              remasking=options.remasking, generator=generator, record_predictions=record_predictions,
                              tempered_confidence=options.tempered_confidence, min_new_tokens=options.min_new_tokens,
                              prefill=prefill)


__all__ = ["LLaDAOptions", "LLaDASampler", "REMASKING_RULES", "check_schedule", "commit_priority", "continue_denoising",
           "denoise_blocks", "FullForward", "ScheduledCommit", "write_commits"]
