"""Denoising samplers for masked diffusion LMs.

``generate_masked_diffusion`` is LLaDA's semi-autoregressive sampler (Nie et al., 2025, Algorithm "low
confidence remasking"), batched: the completion is split into blocks decoded left to right; inside a block
each step predicts every masked token at once and commits the most confident few, spreading the block's
tokens evenly over its steps with the remainder on the first steps. Besides the tokens it returns, for
every completion token, the step at which it was committed: trajectory methods replay that order.

Rows are left-padded prompts followed by ``gen_length`` mask tokens; pad keys are hidden by the attention
mask and positions count only real tokens, so a batched row computes what it computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dare_gym.device import uniform

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``logits_fn(input_ids, attention_mask) -> logits [B, T, V]`` with logits[:, i] predicting token i."""

REMASKING_RULES = ("low_confidence", "random")


@dataclass
class SamplerOutput:
    completion_ids: torch.Tensor  # [B, gen_length]
    unmask_step: torch.Tensor  # [B, gen_length], global step (0-based) at which each token was committed
    num_forward_passes: int
    # With record_predictions: the sampler's full guess x̂₀ at every step (masked positions filled with that
    # step's predictions) and the probability of each guess; committed positions hold their token and 1.
    step_predictions: torch.Tensor | None = None  # [B, steps, gen_length]
    step_confidence: torch.Tensor | None = None  # [B, steps, gen_length]


def tokens_per_step(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each of ``steps`` steps commits, per row: an even split, remainder on the first steps.

    ``masked_count`` is [B]; the result is [B, steps]. Example: 4 tokens over 3 steps -> [2, 1, 1].
    """
    base = masked_count[:, None] // steps
    remainder = masked_count[:, None] % steps
    step_index = torch.arange(steps, device=masked_count.device)[None, :]
    return base + (step_index < remainder).long()


def gumbel_max_sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) by the Gumbel-max trick, in float64.

    Low-precision Gumbel noise measurably lowers sample quality (LLaDA's note on ``add_gumbel_noise``), so
    the noise and the perturbed scores are float64. ``temperature == 0`` is greedy.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = uniform(logits.shape, generator, logits.device, torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    # argmax(exp(l) / (-log u)^T) == argmax(l - T log(-log u)); the log form cannot overflow.
    perturbed = logits.double() - temperature * torch.log(-torch.log(u))
    return perturbed.argmax(dim=-1)


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Validate the block schedule; returns the number of steps per block."""
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if not isinstance(value, int) or value < 1:
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


@torch.no_grad()
def generate_masked_diffusion(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    mask_token_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
    record_predictions: bool = False,
) -> SamplerOutput:
    """Decode ``gen_length`` tokens after each left-padded prompt row.

    Args:
        logits_fn: the model, as ``(input_ids, attention_mask) -> logits``.
        prompt_ids, prompt_mask: [B, P] left-padded prompts and their 0/1 attention mask.
        temperature: Gumbel-max sampling temperature for the predicted tokens; 0 is greedy.
        remasking: which masked positions to commit first: ``low_confidence`` (highest probability of the
            predicted token) or ``random``.
        generator: seeds the Gumbel noise and random remasking.
        record_predictions: also return every step's x̂₀ and its confidences (MDPO's intermediate rewards);
            positions right of the current block get greedy guesses that do not touch the random stream.
    """
    if remasking not in REMASKING_RULES:
        raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {remasking!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    steps_per_block = check_schedule(gen_length, steps, block_length)
    batch, prompt_length = prompt_ids.shape
    device = prompt_ids.device
    x = torch.cat([prompt_ids, prompt_ids.new_full((batch, gen_length), mask_token_id)], dim=1)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones((batch, gen_length))], dim=1)
    unmask_step = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    global_step = 0
    predictions, confidences = [], []

    for block in range(gen_length // block_length):
        start = prompt_length + block * block_length
        end = start + block_length
        schedule = tokens_per_step((x[:, start:end] == mask_token_id).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            # Candidates are all masked positions left of the block's end. Normally that is the current
            # block, but a model can predict the mask token itself, leaving it masked; the reference sampler
            # then revisits it later, so we do too. Only columns some row still has to decode are scored.
            masked = x[:, :end] == mask_token_id
            columns = masked.any(dim=0).nonzero().squeeze(1)
            masked = masked[:, columns]
            all_logits = logits_fn(x, attention_mask)
            logits = all_logits[:, columns]
            predicted = gumbel_max_sample(logits, temperature, generator)
            if remasking == "low_confidence":
                probs = torch.softmax(logits.double(), dim=-1)
                confidence = probs.gather(-1, predicted[..., None]).squeeze(-1)
            else:
                confidence = uniform(predicted.shape, generator, device, torch.float64)
            confidence = confidence.masked_fill(~masked, float("-inf"))
            count = schedule[:, step]
            chosen = confidence.topk(int(count.max()), dim=-1).indices  # most confident first
            keep = torch.arange(chosen.shape[1], device=device)[None, :] < count[:, None]
            commit = torch.zeros_like(masked)
            commit[rows.expand_as(chosen)[keep], chosen[keep]] = True
            commit &= masked
            if record_predictions:
                guess, guess_confidence = _full_guess(x, all_logits, columns, predicted, masked, prompt_length,
                                                      mask_token_id)
                predictions.append(guess)
                confidences.append(guess_confidence)
            x[:, columns] = torch.where(commit, predicted, x[:, columns])
            in_completion = columns >= prompt_length
            completion_columns = columns[in_completion] - prompt_length
            unmask_step[:, completion_columns] = torch.where(
                commit[:, in_completion], global_step, unmask_step[:, completion_columns]
            )
            global_step += 1

    recorded = {}
    if record_predictions:
        recorded = dict(step_predictions=torch.stack(predictions, dim=1), step_confidence=torch.stack(confidences, dim=1))
    return SamplerOutput(
        completion_ids=x[:, prompt_length:], unmask_step=unmask_step, num_forward_passes=global_step, **recorded
    )


def _full_guess(x, all_logits, columns, predicted, masked, prompt_length, mask_token_id):
    """This step's x̂₀ over the completion: the step's own predictions in the candidate columns, greedy
    guesses for masked positions further right, committed tokens elsewhere (with confidence 1)."""
    completion = all_logits[:, prompt_length:].double()
    probs = torch.softmax(completion, dim=-1)
    guess = torch.where(x[:, prompt_length:] == mask_token_id, probs.argmax(dim=-1), x[:, prompt_length:])
    in_completion = columns >= prompt_length
    positions = columns[in_completion] - prompt_length
    guess[:, positions] = torch.where(masked[:, in_completion], predicted[:, in_completion], guess[:, positions])
    confidence = probs.gather(-1, guess[..., None]).squeeze(-1)
    confidence = torch.where(x[:, prompt_length:] == mask_token_id, confidence, torch.ones_like(confidence))
    return guess, confidence.float()
