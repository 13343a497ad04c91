"""DiPO (Discrete diffusion Policy Optimization; DiRL, Zhu et al., 2025, arXiv 2512.22234): unbiased step-level
GRPO for block-diffusion models.

Followed: the official code (OpenMOSS/DiRL at ec4bfb3: ``train/grpo.py`` ``generate_training_samples_for_one``,
``collect_training_data`` and the gradient-accumulation count; ``models/sdar/modeling_sdar.py``'s
``compute_rl_loss`` branch; ``train/rollout_dapo_server.py``'s advantages and filter; ``configs/rl.yaml`` and
``scripts/grpo.sh``), which the paper describes.

A block-diffusion sampler commits each block's tokens over a few steps. DiPO trains on exactly those states:
round r of a completion takes, in *every* block at once, the tokens its block committed at the block's r-th
distinct denoising step (the targets), masks them and every token its block committed later, and keeps the
tokens committed earlier in the block. One block-diffusion forward (each noised block sees the clean blocks
before it, :meth:`DiffusionPolicy.logits` with ``clean_ids``) then scores every block in the state the sampler
saw before that step, so each token is scored once, in the state that produced it: the likelihood of the
rollout's own trajectory, with no mean-field approximation (the paper's "unbiased"). A response makes at most
``block_size`` rounds. With ρ = exp(clamp(log π_θ − log π_old, ±10)) per token,

    ℓ_{i,r} = mean_{k ∈ targets(i, r)} [ −min(ρ_ik A_i, clip(ρ_ik, 1 − ε, 1 + ε_high) A_i) + β·k3_ik ]
    loss    = Σ_i Σ_r ℓ_{i,r} / (N · block_size)

(the official code pads every response to ``block_size`` rounds with empty rows and averages over all of them:
a response with fewer rounds weighs less per round); k3 = e^{clamp(u, ±10)} − 1 − u with u = log π_ref − log π_θ.
Advantages are the group z-score with the population std and no epsilon (a uniform group gets 0), and groups
whose completions all scored the same are dropped (DAPO's dynamic-sampling filter, 0 < mean correctness < 1;
the official rollout then samples more prompts to refill the batch, the trainer here trains on fewer rows).
The targets are the response tokens up to and including the first stop token; the positions after it are masked
in every round (the official code truncates there and pads the last block with [MASK]).

Defaults (``configs/rl.yaml`` with ``scripts/grpo.sh``): ε = 0.2 with ε_high = ε + 0.08 = 0.28 (the official
``1 + eps + 0.08``), log-ratio clamp 10, β = 0 (``KL=0`` in the scripts; rl.yaml's 0.1 is overridden), μ = 1;
run settings: lr 1e-6, G = 8, SDAR's block 4 with 4 steps per block, temperature 1.0, top-k 50, dynamic
threshold 0.9. Not followed: ``shrink`` > 1 (the official default is 1).

Neighbours: dLLM-RL's ``rl_sdar.py`` (TraceRL) builds the same rounds, but divides each row's
surrogate sum by the batch's longest response L₁ and takes its "KL" against π_old, where DiPO takes each row's
token mean over N·block_size rows, clips higher, clamps the log-ratio and penalises towards a frozen reference;
this repository's ``tracerl`` replays one *global* step per row (the same per-token log-probs, one forward per
step rather than per round). CJ-GRPO replays the same states on full-attention models with a per-step token
mean. DiPO needs block-causal attention: full-attention families are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, masked_mean, register_algorithm
from dare_gym.algorithms.options import Clip, ClipHigher, GroupAdvantages, KLPenalty, ResponseMask
from dare_gym.core.estimators import Draw, TokenScores
from dare_gym.core.logprobs import token_entropy, token_log_probs

LOG_RATIO_BOUND = 10.0  # the official clamp of log π_θ − log π_ref inside k3's exponential


@dataclass
class DiPOConfig(ResponseMask, GroupAdvantages, KLPenalty, ClipHigher, Clip, AlgorithmConfig):
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    """upper clip range: the official clips the ratio to [1 − eps, 1 + eps + 0.08]"""
    log_ratio_clamp: float | None = 10.0
    beta: float = 0.0
    """weight of the k3 term towards the frozen reference (the official scripts run KL=0)"""
    advantage_std_eps: float = 0.0
    drop_zero_variance_groups: bool = True
    response_mask: str = "through_stop"


def block_rounds(unmask_step: torch.Tensor, response: torch.Tensor, first_position: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """[B, L] the round of each response token: the rank of its commit step among the distinct commit steps of
    its block (0 for the block's first step), −1 outside the response. Blocks are the model's grid: completion
    position j of row b sits at real position ``first_position[b] + j`` (the prompt's real length), in block
    ``(first_position[b] + j) // block_size``, so the prompt's last, partial block is shared with the first
    completion tokens, as the sampler decodes it."""
    rounds = torch.full_like(unmask_step, -1)
    position = first_position[:, None] + torch.arange(unmask_step.shape[1], device=unmask_step.device)[None, :]
    block = position // block_size
    for row in range(unmask_step.shape[0]):
        for index in torch.unique(block[row][response[row]]):
            members = response[row] & (block[row] == index)
            steps = unmask_step[row][members]
            rounds[row][members] = torch.searchsorted(torch.unique(steps), steps)
    return rounds


class BlockRounds:
    """DiPO's likelihood: one block-diffusion forward per round, scoring each round's targets in the state the
    sampler committed them in (see the module docstring). ``block_size`` is the policy's (set by ``prepare``)."""

    name = "dipo_rounds"
    forwards_per_sample = None  # one per round: at most block_size
    deterministic = True  # no random noise: every inner iteration replays the same states

    def __init__(self, mask_token_id: int, block_size: int | None = None):
        self.mask_token_id = mask_token_id
        self.block_size = block_size

    def sample_noise(self, batch, generator=None) -> dict[str, torch.Tensor]:
        if batch.unmask_step is None:
            raise ValueError("DiPO replays the rollout's denoising steps; this batch has no unmask_step")
        if self.block_size is None:
            raise ValueError("DiPO needs the policy's block size (a block-causal model)")
        response = batch.completion_mask.bool() & (batch.unmask_step >= 0)
        first_position = batch.prompt_attention.long().sum(dim=1)
        return {"round": block_rounds(batch.unmask_step, response, first_position, self.block_size)}

    def token_logp(self, logits_fn, batch, noise) -> TokenScores:
        rounds = noise["round"]
        completion = batch.completion_ids
        logp = torch.zeros(completion.shape, device=completion.device)
        entropy = torch.zeros_like(logp)
        draws = []
        for r in range(int(rounds.max()) + 1):
            targets = rounds == r
            if not targets.any():
                continue
            # the round's state: its targets, later commits and everything outside the response masked
            state = completion.masked_fill((rounds >= r) | (rounds < 0), self.mask_token_id)
            logits = logits_fn(torch.cat([batch.prompt_ids, state], dim=1), batch.attention_mask,
                               logits_to_keep=completion.shape[1], clean_ids=batch.input_ids)
            round_logp = token_log_probs(logits, completion)
            logp = torch.where(targets, round_logp, logp)
            entropy = torch.where(targets, token_entropy(logits), entropy)
            draws.append(Draw(round_logp, targets, torch.ones(completion.shape[0], device=completion.device)))
        return TokenScores(logp, rounds >= 0, entropy, draws)


def dipo_loss(per_token: torch.Tensor, round_targets: list[torch.Tensor], responses: int,
              block_size: int) -> torch.Tensor:
    """Σ over (response, round) rows of the row's mean per-token loss, over ``responses · block_size`` rows (the
    official padding of every response to block_size rounds)."""
    total = per_token.new_zeros(())
    for targets in round_targets:
        counts = targets.sum(dim=1)
        row_means = (per_token * targets).sum(dim=1) / counts.clamp(min=1)
        total = total + row_means[counts > 0].sum()
    return total / (responses * block_size)


@register_algorithm("dipo", DiPOConfig)
class DiPO(PolicyGradient):
    population_std = True

    def build_estimator(self, mask_token_id: int):
        return BlockRounds(mask_token_id)

    @classmethod
    def refusal(cls, family) -> str | None:
        reason = super().refusal(family)
        if reason is None and family.block_size_key is None:
            return block_causal_reason("this family's models have full attention")
        return reason

    @classmethod
    def model_refusal(cls, family, model_config) -> str | None:
        reason = cls.refusal(family)
        if reason is None and model_config is not None and family.block_size(model_config) is None:
            return block_causal_reason(f"this {family.name} model has full attention (its config sets no block size)")
        return reason

    @torch.no_grad()
    def prepare(self, policy, reference, buffer, generator, micro_batch_size=64):
        if policy.block_size is None:
            raise ValueError(f"dipo trains block-causal models; this {policy.family.name} model has full attention")
        self.estimator.block_size = policy.block_size
        super().prepare(policy, reference, buffer, generator, micro_batch_size)

    def loss(self, policy, batch, iteration):
        config = self.config
        inputs, scores, old_logp, ref_logp = self.score(policy, batch, iteration)
        advantages = batch.advantage.to(scores.logp.device)[:, None]
        log_ratio = scores.logp - old_logp
        if config.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
        ratio = log_ratio.exp()
        high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        clipped = ratio.clamp(1 - config.epsilon, 1 + high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        mask = inputs.completion_mask.bool() & scores.scored
        metrics = {"clip_fraction": masked_mean(((ratio * advantages) > (clipped * advantages)).float(), mask),
                   "entropy": masked_mean(scores.entropy, mask), "rounds": float(len(scores.draws))}
        if config.beta > 0 and ref_logp is not None:
            u = ref_logp - scores.logp
            kl = torch.exp(u.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)) - 1 - u
            per_token = per_token + config.beta * kl
            metrics["kl_ref"] = masked_mean(kl.detach(), mask)
        targets = [draw.masked & mask for draw in scores.draws]
        return dipo_loss(per_token, targets, len(batch), self.estimator.block_size), metrics


def block_causal_reason(why_not: str) -> str:
    return (f"DiPO scores each block in the state before its r-th denoising step given the clean blocks before it, "
            f"which needs block-causal attention; {why_not} (it trains sdar, llada2 and block-causal tiny models)")
