"""SFT as behaviour cloning: the masked-diffusion ELBO (LLaDA's SFT objective) on good answers.

``source: rollouts`` clones the buffer's best rollouts (rejection-sampling fine-tuning: in each group the
completions with the group's top reward, if it reaches ``min_reward``); ``source: demonstrations`` clones the
env's gold answers for the same prompts. Each row draws t ~ U(0, 1], masks each answer token (EOS padding
included) with probability p = (1 − ε)t + ε and scores Σ_masked CE / (p · L_ans); no reference, no ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, register_algorithm

from dare_gym.core.distributed import active_rows, discard_rows
from dare_gym.core.sft import masked_answer_loss, sample_answer_masks


@dataclass
class SFTConfig(AlgorithmConfig):
    num_iterations: int = 1
    source: str = "rollouts"
    """what is cloned: the best rollouts of each group, or demonstrations (the env's gold answers)"""
    min_reward: float = 1.0
    """a group's best rollouts are cloned only if their reward reaches this"""

    def check(self):
        if self.source not in ("rollouts", "demonstrations"):
            raise ValueError(f"source must be 'rollouts' or 'demonstrations', got {self.source!r}")


@register_algorithm("sft", SFTConfig)
class SFT(Algorithm):

    def __init__(self, config: SFTConfig, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.rollout_needs = ("demonstrations",) if config.source == "demonstrations" else ()

    def advantages(self, buffer, group_size):
        if self.config.source == "demonstrations":
            return buffer
        best = buffer.reward.view(-1, group_size).max(dim=1, keepdim=True).values.expand(-1, group_size).flatten()
        return discard_rows(buffer, ~((buffer.reward >= best) & (buffer.reward >= self.config.min_reward)))

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        draws = [sample_answer_masks(*buffer.completion_ids.shape, generator) for _ in range(self.config.num_iterations)]
        buffer.columns["sft_p_mask"] = torch.stack([p for p, _ in draws], dim=1)
        buffer.columns["sft_masked"] = torch.stack([m for _, m in draws], dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        answers = batch.columns["demonstration_ids"].to(policy.device) if "demonstration_ids" in batch.columns else inputs.completion_ids
        present = inputs.attention_mask[:, inputs.prompt_length:].bool()  # EOS padding is a target too
        masked = batch.columns["sft_masked"][:, iteration].to(policy.device) & present & active_rows(inputs)[:, None]
        p_mask = batch.columns["sft_p_mask"][:, iteration].to(policy.device)
        loss = masked_answer_loss(policy, inputs, answers, masked, p_mask, present.sum(dim=1))
        return loss, {"cloned_rows": float(len(batch))}


