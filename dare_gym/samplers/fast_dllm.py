"""Fast-dLLM (Wu et al., 2025) for full-attention dLLMs (tiny, LLaDA, Dream): KV caches plus parallel decoding.

It is LLaDA's block loop (``llada.py``) with two things swapped in:

* **Caches** (``cache``). ``prefix``: at the start of every block one full forward, whose keys/values left of
  the block are kept; its logits serve the block's first step, and later steps feed only [block; suffix].
  ``dual``: the same block-start forward also keeps the masked suffix's keys/values, and later steps feed only
  the block. Both are approximate under bidirectional attention (the cached states do not see what the block
  commits until the next refresh): ``SamplerOutput.commit_logp`` records what the rollout believed, for the
  rollout/train mismatch.
* **Parallel commit rules.** ``threshold`` τ: every masked token of the block with confidence ≥ τ, at least the
  most confident one, so a block takes as many steps as it needs. ``factor`` f: the most confident n with
  c₍ⱼ₎ ≥ 1 − f/(j+1) for every j ≤ n (at least one); we follow the paper's rule, not the official code's quirk of
  committing every candidate when only the last fails (ALGORITHMS.md §O).

``early_exit`` stops once every row has committed a stop token with nothing masked before it (the rest becomes
that token). With ``cache="none"``, no threshold/factor and no early exit this is the LLaDA sampler token for
token. Block-causal models (SDAR) have exact caches instead: the ``block_diffusion`` sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.models.caching import StaticKVCache
from dare_gym.samplers.base import Sampler, SamplerOutput, register_sampler, top_n
from dare_gym.samplers.llada import FullForward, LLaDAOptions, ScheduledCommit, denoise_blocks

CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class FastDLLMOptions(LLaDAOptions):
    cache: str = "dual"
    """none | prefix (keys/values left of the block, refreshed each block) | dual (prefix and masked suffix)"""
    threshold: float | None = 0.9
    """commit every masked token of the block with confidence >= threshold (at least one); null: LLaDA's schedule"""
    factor: float | None = None
    """Fast-dLLM's factor rule instead of a threshold (commit n while c_j >= 1 - factor/(j+1))"""
    early_exit: bool = True
    """stop once every row has a stop token with nothing masked before it"""

    def __post_init__(self):
        super().__post_init__()
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("set threshold or factor, not both")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor must be > 0, got {self.factor!r}")


# -------------------------------------------------------------------------------------------- commit rules


class ThresholdCommit:
    """Every candidate with confidence ≥ τ, and at least each row's most confident one."""

    adaptive = True

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, confidence: torch.Tensor, scheduled: torch.Tensor) -> torch.Tensor:
        return (confidence >= self.threshold) | top_n(confidence, torch.ones_like(scheduled))


class FactorCommit:
    """The longest prefix of the confidences sorted high to low with c₍ⱼ₎ ≥ 1 − f/(j+1) (τ₁ = −1: at least one)."""

    adaptive = True

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, confidence: torch.Tensor, scheduled: torch.Tensor) -> torch.Tensor:
        ordered = confidence.sort(dim=-1, descending=True).values
        rank = torch.arange(1, ordered.shape[1] + 1, device=confidence.device, dtype=ordered.dtype)
        passes = ordered >= 1 - self.factor / (rank + 1)
        passes[:, 0] = torch.isfinite(ordered[:, 0])
        count = passes.long().cumprod(dim=-1).sum(dim=-1)
        return top_n(confidence, count)


# ------------------------------------------------------------------------------------------------- caches


def _query_start(policy, start: int) -> int:
    """The first column a cached step must feed: a shifted family (Dream) reads token i from position i−1."""
    return start - 1 if policy.family.shift_logits else start


class PrefixCache:
    """Keys/values left of the current block, from one full forward at the block's start; later steps feed
    [block; suffix] and write their keys in place right after the prefix (in sequence order, as the keys of a
    cache extended by the fed tokens are). One buffer of the sequence's width serves every block and step."""

    cache: StaticKVCache | None = None

    def begin_block(self, start: int, end: int) -> None:
        self.start, self.fresh = start, True

    def __call__(self, policy, x, attention_mask, wanted: torch.Tensor, end: int):
        total = x.shape[1]
        if self.cache is None:
            self.cache = StaticKVCache(total)
        query_start = _query_start(policy, self.start)
        if self.fresh:  # the block's first step: a full forward, whose keys left of the block stay
            self.fresh = False
            return wanted, policy.logits(x, attention_mask, cache=self.cache.window(0, total),
                                         logits_to_keep=wanted), x.numel()
        scored = wanted[wanted >= self.start]
        fed = x[:, query_start:]
        logits = policy.logits(fed, attention_mask, cache=self.cache.window(query_start, total),
                               logits_to_keep=scored - query_start)
        return scored, logits, fed.numel()


class DualCache:
    """Keys/values left of the block and of the (masked) suffix right of it, from the block's first forward;
    later steps feed only the block.

    The keys sit in one buffer of the sequence's width as [prefix; suffix; block]: the block's full forward
    writes them in sequence order, the suffix then moves next to the prefix (once per block), and every later
    step writes the block's fresh keys in place into the last slot. The padding mask of that order and the
    block's positions are built once per block."""

    cache: StaticKVCache | None = None

    def begin_block(self, start: int, end: int) -> None:
        self.start, self.end, self.fresh = start, end, True

    def __call__(self, policy, x, attention_mask, wanted: torch.Tensor, end: int):
        total, device = x.shape[1], x.device
        if self.cache is None:
            self.cache = StaticKVCache(total)
        query_start = _query_start(policy, self.start)
        if self.fresh:
            self.fresh = False
            logits = policy.logits(x, attention_mask, cache=self.cache.window(0, total), logits_to_keep=wanted)
            self.cache.move(self.end, total, query_start)  # [prefix; suffix; free slot for the block]
            kept = torch.cat([torch.arange(query_start, device=device), torch.arange(self.end, total, device=device)])
            self.mask = torch.cat([attention_mask[:, kept], attention_mask[:, query_start:self.end]], dim=1)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            self.block_positions = positions[:, query_start:self.end]
            return wanted, logits, x.numel()
        scored = wanted[(wanted >= self.start) & (wanted < self.end)]
        block = x[:, query_start:self.end]
        logits = policy.logits(block, self.mask, cache=self.cache.window(total - block.shape[1], total),
                               position_ids=self.block_positions, logits_to_keep=scored - query_start)
        return scored, logits, block.numel()


FORWARDS = {"none": FullForward, "prefix": PrefixCache, "dual": DualCache}


@register_sampler("fast_dllm")
class FastDLLMSampler(Sampler):
    """LLaDA's block loop with Fast-dLLM's caches, parallel commit rules and early exit."""

    options_class = FastDLLMOptions
    takes_min_new_tokens = True
    accepts_prefill = True

    def data_dependent_steps(self, options) -> str | None:
        if options.threshold is not None or options.factor is not None or options.early_exit:
            return "decides how many tokens a step commits, or when to stop, from the data: set options " \
                   "{threshold: null, factor: null, early_exit: false}"
        return None

    def left_to_right(self, policy, gen_length: int) -> dict:
        return {"block_length": 1, "steps": gen_length}  # one-token blocks: the threshold cannot commit more

    def __call__(self, policy, prompt_ids, prompt_mask, options: FastDLLMOptions, *, generator=None,
                 record_predictions=False, prefill=None) -> SamplerOutput:
        if policy.block_size is not None:
            raise ValueError(f"fast_dllm's caches approximate full attention; this {policy.family.name} model is "
                             f"block-causal (block_size={policy.block_size}): use sampler='block_diffusion'")
        if options.threshold is not None:
            commit = ThresholdCommit(options.threshold)
        elif options.factor is not None:
            commit = FactorCommit(options.factor)
        else:
            commit = ScheduledCommit()
        return denoise_blocks(
            policy, prompt_ids, prompt_mask, gen_length=options.gen_length, steps=options.steps,
            block_length=options.block_length, temperature=options.temperature, remasking=options.remasking,
            generator=generator, record_predictions=record_predictions, forward=FORWARDS[options.cache](),
            commit=commit, early_exit=options.early_exit, tempered_confidence=options.tempered_confidence,
            min_new_tokens=options.min_new_tokens, prefill=prefill)


__all__ = ["FastDLLMOptions", "FastDLLMSampler", "ThresholdCommit", "FactorCommit", "PrefixCache", "DualCache",
           "CACHE_MODES"]
