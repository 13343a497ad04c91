"""Masked-diffusion supervised fine-tuning (LLaDA's SFT objective) on (prompt, answer) pairs.

Answers are padded with EOS to a fixed length, and the EOS padding is an ordinary target: that is how a
masked diffusion LM learns to stop. Each row draws t ~ U(0, 1], masks each answer token with probability
p = (1 − ε)t + ε, never the prompt, and the loss is Σ_masked CE / (p · L_ans), averaged over rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dare_gym.buffer import SequenceBatch
from dare_gym.losses import masked_diffusion_sft_loss

P_MASK_EPS = 1e-3


def demonstration_batch(policy, prompts: Sequence[str], answers: Sequence[str], answer_length: int) -> SequenceBatch:
    """Left-padded prompts followed by answers right-padded with EOS to ``answer_length`` tokens."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids, prompt_mask = policy.encode_prompts(prompts)
    eos = policy.tokenizer.eos_token_id
    rows = []
    for answer in answers:
        ids = policy.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) >= answer_length:
            raise ValueError(
                f"answer {answer[:40]!r} is {len(ids)} tokens; answer_length={answer_length} leaves no room for EOS"
            )
        rows.append(ids + [eos] * (answer_length - len(ids)))
    answer_ids = torch.tensor(rows, dtype=torch.long, device=prompt_ids.device)
    return SequenceBatch(
        input_ids=torch.cat([prompt_ids, answer_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, torch.ones_like(answer_ids)], dim=1),
        prompt_length=prompt_ids.shape[1],
        completion_mask=torch.ones_like(answer_ids),
    )


def masked_diffusion_loss(policy, batch: SequenceBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo sample of the SFT ELBO loss for a batch of demonstrations."""
    answers = batch.completion_ids
    rows, length = answers.shape
    t = 1 - torch.rand(rows, generator=generator)  # U(0, 1]
    p_mask = ((1 - P_MASK_EPS) * t + P_MASK_EPS).to(answers.device)
    masked = (torch.rand(rows, length, generator=generator).to(answers.device) < p_mask[:, None])
    masked &= batch.completion_mask.bool()
    noised = answers.masked_fill(masked, policy.mask_token_id)
    logits = policy.logits(torch.cat([batch.prompt_ids, noised], dim=1), batch.attention_mask)
    answer_lengths = batch.completion_mask.sum(dim=1)
    return masked_diffusion_sft_loss(logits[:, batch.prompt_length :], answers, masked, p_mask, answer_lengths)
