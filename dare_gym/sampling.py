"""The LLaDA sampler's pieces under their old names (the samplers now live in :mod:`dare_gym.samplers`)."""

from __future__ import annotations

import torch

from dare_gym.samplers.base import SamplerOutput, gumbel_max_sample, tokens_per_step
from dare_gym.samplers.llada import REMASKING_RULES, check_schedule, denoise_blocks


class _LogitsPolicy:
    """What the block loop needs of a policy, around a bare ``logits_fn``."""

    family = None
    block_size = None
    stop_token_ids: list[int] = []

    def __init__(self, logits_fn, mask_token_id: int):
        self.logits, self.mask_token_id = logits_fn, mask_token_id


def generate_masked_diffusion(logits_fn, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, mask_token_id: int,
                              gen_length: int, steps: int, block_length: int, temperature: float = 0.0,
                              remasking: str = "low_confidence", generator: torch.Generator | None = None,
                              record_predictions: bool = False) -> SamplerOutput:
    """LLaDA's sampler over ``logits_fn(input_ids, attention_mask, logits_to_keep=0)``."""
    return denoise_blocks(_LogitsPolicy(logits_fn, mask_token_id), prompt_ids, prompt_mask, gen_length=gen_length,
                          steps=steps, block_length=block_length, temperature=temperature, remasking=remasking,
                          generator=generator, record_predictions=record_predictions)


__all__ = ["generate_masked_diffusion", "check_schedule", "tokens_per_step", "gumbel_max_sample", "REMASKING_RULES",
           "SamplerOutput"]
