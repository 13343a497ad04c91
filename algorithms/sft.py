"""SFT as behaviour cloning: the masked-diffusion ELBO (LLaDA's SFT objective) on good answers.

``source: rollouts`` clones the buffer's best rollouts (rejection-sampling fine-tuning: in each group the
completions with the group's top reward, if it reaches ``min_reward``); ``source: demonstrations`` clones the
env's gold answers for the same prompts. Each row draws t ~ U(0, 1], masks each answer token (EOS padding
included) with probability p = (1 − ε)t + ε and scores Σ_masked CE / (p · L_ans); no reference, no ratio.
A uniform-noise model (DiffusionGemma) is cloned with its own SFT objective instead
(:func:`dare_gym.uniform_estimators.uniform_sft_loss`: answers corrupted with uniform tokens at t ~ U(ε, 1), mean
cross-entropy over every answer position, two-pass self-conditioning for half the rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dare_gym.algorithms.base import Algorithm, AlgorithmConfig, register_algorithm

from dare_gym.distributed import active_rows, discard_rows
from dare_gym.sft import masked_answer_loss, sample_answer_masks
from dare_gym.uniform_estimators import sft_noise, uniform_sft_loss


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
    supported_noise = ("mask", "uniform")  # uniform: DiffusionGemma's own SFT objective (prepare/loss below)

    def __init__(self, config: SFTConfig, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.rollout_needs = ("demonstrations",) if config.source == "demonstrations" else ()

    def advantages(self, buffer, group_size):
        if self.config.source == "demonstrations":
            return buffer
        best = buffer.reward.view(-1, group_size).max(dim=1, keepdim=True).values.expand(-1, group_size).flatten()
        return discard_rows(buffer, ~((buffer.reward >= best) & (buffer.reward >= self.config.min_reward)))

    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        if self.model_noise == "uniform":  # one corruption of the cloned answers per iteration, kept with the rows
            answers = buffer.columns.get("demonstration_ids", buffer.completion_ids)
            present = buffer.unmask_step >= 0
            draws = [sft_noise(answers, present, self.vocab_size, generator) for _ in range(self.config.num_iterations)]
            for name in draws[0]:
                buffer.columns[f"sft_uniform.{name}"] = torch.stack([d[name] for d in draws], dim=1)
            return
        draws = [sample_answer_masks(*buffer.completion_ids.shape, generator) for _ in range(self.config.num_iterations)]
        buffer.columns["sft_p_mask"] = torch.stack([p for p, _ in draws], dim=1)
        buffer.columns["sft_masked"] = torch.stack([m for _, m in draws], dim=1)

    def loss(self, policy, batch, iteration):
        inputs = batch.model_inputs(policy.device)
        answers = batch.columns["demonstration_ids"].to(policy.device) if "demonstration_ids" in batch.columns else inputs.completion_ids
        present = inputs.attention_mask[:, inputs.prompt_length:].bool()  # EOS padding is a target too
        if self.model_noise == "uniform":
            column = {name: batch.columns[f"sft_uniform.{name}"][:, iteration].to(policy.device)
                      for name in ("noisy", "self_conditioning")}
            present = present & active_rows(inputs)[:, None]
            if "demonstration_ids" not in batch.columns and "trace.filled" in batch.columns:
                # what the sampler wrote without the model (pad, or canvases after every row stopped): no target
                filled = batch.columns["trace.filled"].to(policy.device).bool()
                present = present & ~filled
            loss = uniform_sft_loss(policy, inputs.prompt_ids, inputs.prompt_attention, answers, present,
                                    column["noisy"], column["self_conditioning"])
            return loss, {"cloned_rows": float(len(batch))}
        masked = batch.columns["sft_masked"][:, iteration].to(policy.device) & present & active_rows(inputs)[:, None]
        p_mask = batch.columns["sft_p_mask"][:, iteration].to(policy.device)
        loss = masked_answer_loss(policy, inputs, answers, masked, p_mask, present.sum(dim=1))
        return loss, {"cloned_rows": float(len(batch))}


