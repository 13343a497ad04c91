"""SFT as behaviour cloning: the masked-diffusion ELBO (LLaDA's SFT objective) on good answers.

``source: rollouts`` clones the buffer's best rollouts (rejection-sampling fine-tuning: in each group the
completions with the group's top reward, if it reaches ``min_reward``); ``source: demonstrations`` clones the
env's gold answers for the same prompts. Each row draws t ~ U(0, 1], masks each answer token (EOS padding
included) with probability p = (1 − ε)t + ε and scores Σ_masked CE / (p · L_ans); no reference, no ratio.
Followed: LLaDA's SFT objective (its paper's Eq. 5 and guidelines); block-causal policies use block
diffusion's doubled forward (SDAR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, Rollout, RolloutContext, register_algorithm
from dare_gym.core.sft import masked_answer_loss, sample_answer_masks

# Buffer columns this algorithm writes and reads.
DEMONSTRATION_IDS = "sft.demonstration_ids"  # [N, L] the env's gold answer, tokenised and EOS-padded
P_MASK, MASKED = "sft.p_mask", "sft.masked"  # [N, μ] and [N, μ, L]: each iteration's masking level and mask


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


@dataclass
class DemonstrationRollout(Rollout):
    """The default rollout, with each prompt's gold answer tokenised beside it, EOS-padded to the completions'
    width."""

    context: RolloutContext | None = None

    def buffer(self, rewards, group_ids, correct=None):
        buffer = super().buffer(rewards, group_ids, correct)
        try:
            answers = self.context.demonstrations(self.context.indices)
        except NotImplementedError as error:
            raise ValueError(f"{self.context.env_id}: {error}; use sft's source: rollouts") from None
        tokenizer, width = self.policy.tokenizer, buffer.completion_ids.shape[1]
        rows = []
        for answer in answers:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: width - 1]
            rows.append(ids + [tokenizer.eos_token_id] * (width - len(ids)))
        buffer.columns[DEMONSTRATION_IDS] = torch.tensor(rows, dtype=torch.long)
        return buffer


@register_algorithm("sft", SFTConfig)
class SFT(Algorithm):
    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator, batch_size: int,
                settings: dict[str, Any], context: RolloutContext | None = None) -> Rollout:
        rollout = super().rollout(policy, prompts, group_size=group_size, generator=generator,
                                  batch_size=batch_size, settings=settings)
        if self.config.source == "rollouts":
            return rollout
        if context is None:
            raise ValueError("sft with source: demonstrations needs the env's gold answers (a RolloutContext)")
        return DemonstrationRollout(rollout.prompts, rollout.completions, policy, rollout.response_mask,
                                    context=context)

    def advantages(self, buffer, group_size):
        if self.config.source == "demonstrations":
            return buffer
        best = buffer.reward.view(-1, group_size).max(dim=1, keepdim=True).values.expand(-1, group_size).flatten()
        return buffer.discard(~((buffer.reward >= best) & (buffer.reward >= self.config.min_reward)))

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        draws = [sample_answer_masks(*buffer.completion_ids.shape, generator) for _ in range(self.config.num_iterations)]
        buffer.columns[P_MASK] = torch.stack([p for p, _ in draws], dim=1)
        buffer.columns[MASKED] = torch.stack([m for _, m in draws], dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        cloned = batch.columns.get(DEMONSTRATION_IDS)
        answers = inputs.completion_ids if cloned is None else cloned.to(policy.device)
        present = inputs.attention_mask[:, inputs.prompt_length:].bool()  # EOS padding is a target too
        masked = batch.columns[MASKED][:, iteration].to(policy.device) & present & inputs.active_rows()[:, None]
        p_mask = batch.columns[P_MASK][:, iteration].to(policy.device)
        loss = masked_answer_loss(policy, inputs, answers, masked, p_mask, present.sum(dim=1))
        return loss, {"cloned_rows": float(len(batch))}
