"""Exact block-diffusion decoding for block-causal models (SDAR; the block-causal tiny model), as SDAR's
``block_diffusion_generate`` and SGLang's LowConfidence decode them.

Blocks sit on the model's own grid: block j of a row holds its real tokens at positions [j·b, (j+1)·b), counted
from the row's first real token, so the prompt's last, partial block is decoded together with the first
completion tokens (its prompt tokens stay fixed). Under block-causal attention a finished block never sees what
comes after it, so its keys/values are cached exactly, once: every forward feeds only the columns after the
cache, and the cache then keeps the columns whose blocks were complete when that forward ran.

Inside a block, each of ``steps_per_block`` steps samples every masked token from its logits divided by the
temperature, then top-k, then top-p filtered (SDAR's order: the nucleus is taken on the tempered distribution),
and commits by ``remasking_strategy``: ``low_confidence_static`` (the scheduled n_s most confident),
``low_confidence_dynamic`` (every token with confidence > τ when there are at least n_s of them, else the n_s
most confident), ``sequential`` (left to right) or ``entropy_bounded`` (SDAR's "eb" sampler: the masked tokens
in order of increasing entropy of their sampling distribution, as many as keep the running sum of entropies
below ``eb_threshold``, at least one). The schedule is SDAR's ``get_num_transfer_tokens(block_length, steps)``:
the block size spread evenly over the block's steps, remainder first, whatever the block still has masked (the
prompt's partial block included); a step never commits more than its block has masked.

Rows of a batch are laid out so that their block grids share column boundaries (:func:`block_aligned_layout`)
and decode block-synchronously: each row works on its k-th completion block; a row that finishes early waits.
A step feeds at most about two blocks of columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.models.caching import StaticKVCache
from dare_gym.samplers.base import (
    Sampler,
    SamplerOptions,
    SamplerOutput,
    check_prefill,
    column_scoring,
    first_stop_done,
    gumbel_max_sample,
    register_sampler,
    suppress_stop_tokens,
    tokens_per_step,
    top_n,
    write_prefill,
)

BLOCK_REMASKING = ("low_confidence_static", "low_confidence_dynamic", "sequential", "entropy_bounded")


@dataclass
class BlockDiffusionOptions(SamplerOptions):
    steps_per_block: int = 4
    """denoising steps per block (SDAR's denoising_steps; its evaluations use block 4 with 4 steps)"""
    remasking_strategy: str = "low_confidence_dynamic"
    """low_confidence_static | low_confidence_dynamic | sequential | entropy_bounded (SDAR's names)"""
    threshold: float = 0.9
    """the dynamic rule's confidence threshold τ"""
    eb_threshold: float = 0.35
    """the entropy_bounded rule's bound γ on the summed entropy of one step's commits (SDAR's default 0.35)"""
    top_k: int = 0
    """sample among the k most probable tokens (0: all)"""
    top_p: float = 1.0
    """sample within the smallest set of tokens of probability >= top_p"""
    early_exit: bool = True
    """stop once every row has a stop token with nothing masked before it"""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.steps_per_block, int) or self.steps_per_block < 1:
            raise ValueError(f"steps_per_block must be a positive integer, got {self.steps_per_block!r}")
        if self.remasking_strategy not in BLOCK_REMASKING:
            raise ValueError(f"remasking_strategy must be one of {BLOCK_REMASKING}, got {self.remasking_strategy!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not (isinstance(self.eb_threshold, (int, float)) and self.eb_threshold > 0):
            raise ValueError(f"eb_threshold must be a number > 0, got {self.eb_threshold!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k / top-p (nucleus) set set to −inf (the most probable token always stays)."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(ordered.float(), dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered.float(), dim=-1) >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def entropy_bounded(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """[B, C] SDAR's entropy-bounded commit: per row, the candidates (finite ``entropy``) in order of increasing
    entropy, as many as keep the running sum strictly below ``bound``, and at least one."""
    ordered, order = entropy.sort(dim=-1)
    finite = torch.isfinite(ordered)
    running = torch.where(finite, ordered, torch.zeros_like(ordered)).cumsum(dim=-1)
    take = finite & (running < bound)
    take[:, 0] |= finite[:, 0]  # the lowest-entropy candidate always
    return torch.zeros_like(take).scatter(-1, order, take)


def commit_by_rule(rule: str, confidence: torch.Tensor, scheduled: torch.Tensor, threshold: float,
                   entropy: torch.Tensor | None = None, eb_threshold: float = 0.35) -> torch.Tensor:
    """[B, C] the positions a step commits; candidates have finite confidence, columns run left to right.
    ``scheduled`` counts are capped by each row's number of candidates."""
    scheduled = torch.minimum(scheduled, torch.isfinite(confidence).sum(dim=1))
    if rule == "entropy_bounded":
        return entropy_bounded(entropy.masked_fill(~torch.isfinite(confidence), float("inf")), eb_threshold)
    if rule == "low_confidence_static":
        return top_n(confidence, scheduled)
    if rule == "sequential":
        order = torch.arange(confidence.shape[1], 0, -1, device=confidence.device, dtype=confidence.dtype)
        return top_n(torch.where(torch.isfinite(confidence), order.expand_as(confidence), confidence), scheduled)
    confident = (confidence > threshold) & torch.isfinite(confidence)
    enough = confident.sum(dim=1) >= scheduled
    return torch.where(enough[:, None], confident, top_n(confidence, scheduled))


def block_aligned_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen_length: int, block: int,
                         mask_id: int, pad_id: int):
    """Rows re-laid so that every row's blocks start on columns that are multiples of ``block``: row b's real
    tokens start at a multiple of the block (left pads), its ``gen_length`` masks follow its prompt, and fewer
    than ``block`` pads close it. Pads are hidden keys and positions count real tokens, so the model sees each
    row as it sees it alone; shared block boundaries let one cache serve every row exactly.

    Returns (x [B, W], attention mask [B, W], first completion column per row [B])."""
    lengths = prompt_mask.long().sum(dim=1)
    width = int(-(-int((lengths + gen_length).max()) // block) * block)
    starts = (width - lengths - gen_length) // block * block
    batch = prompt_ids.shape[0]
    x = prompt_ids.new_full((batch, width), pad_id)
    attention_mask = prompt_mask.new_zeros((batch, width))
    for row in range(batch):
        start, length = int(starts[row]), int(lengths[row])
        x[row, start:start + length] = prompt_ids[row][prompt_mask[row].bool()]
        x[row, start + length:start + length + gen_length] = mask_id
        attention_mask[row, start:start + length + gen_length] = 1
    return x, attention_mask, starts + lengths


@torch.no_grad()
def decode_blocks_exactly(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: BlockDiffusionOptions,
                          *, generator: torch.Generator | None = None, record_predictions: bool = False,
                          prefill: torch.Tensor | None = None) -> SamplerOutput:
    policy = column_scoring(policy)
    block, gen_length, mask_id = policy.block_size, options.gen_length, policy.mask_token_id
    check_prefill(prefill, prompt_ids.shape[0], gen_length)
    device = prompt_ids.device
    pad_id = policy.tokenizer.pad_token_id if getattr(policy, "tokenizer", None) is not None else 0
    x, attention_mask, completion_start = block_aligned_layout(prompt_ids, prompt_mask, gen_length, block, mask_id,
                                                               pad_id)
    batch, total = x.shape
    column = torch.arange(total, device=device)
    completion_columns = completion_start[:, None] + torch.arange(gen_length, device=device)[None, :]  # [B, G]
    if prefill is not None:  # fixed tokens: never masked, so never candidates (a fully prefilled block is skipped)
        canvas = x.gather(1, completion_columns)
        write_prefill(canvas, prefill, mask_id)
        x.scatter_(1, completion_columns, canvas)
    in_completion = (column[None, :] >= completion_start[:, None]) & attention_mask.bool()
    position = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    block_id = torch.where(attention_mask.bool(), position // block, -1)  # [B, T]; pads belong to no block
    lengths = prompt_mask.long().sum(dim=1)
    first_block, last_block = lengths // block, (lengths + gen_length - 1) // block
    unmask_step = torch.full((batch, total), -1, dtype=torch.long, device=device)
    commit_logp = torch.zeros(batch, total, dtype=torch.float32, device=device)
    stop_ids = torch.tensor(policy.stop_token_ids, dtype=torch.long, device=device)
    guess, guess_confidence = x.clone(), torch.zeros(batch, total, dtype=torch.float32, device=device)
    predictions, confidences = [], []

    def completion(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, completion_columns)

    def block_start(index: torch.Tensor) -> int:
        """The first column of the earliest of the rows' blocks ``index`` (all on the shared grid)."""
        inside = (block_id >= index[:, None]) & (index <= last_block)[:, None]
        return int(torch.where(inside, column[None, :], total).min())

    def finish() -> SamplerOutput:
        recorded = {}
        if predictions:
            recorded = dict(step_predictions=torch.stack(predictions, dim=1),
                            step_confidence=torch.stack(confidences, dim=1))
        return SamplerOutput(completion_ids=completion(x), unmask_step=completion(unmask_step),
                             commit_logp=completion(commit_logp), model_calls=calls, tokens_processed=processed,
                             **recorded)

    # One buffer of the layout's width: each forward writes its fed columns' keys in place and reads the columns
    # before them, so the finished blocks' keys written by earlier forwards are the cache, and nothing is copied.
    cache, cached = StaticKVCache(total), block_start(first_block)
    calls = processed = 0
    if cached > 0:  # prefill: the blocks before every row's first completion block
        policy.logits(x[:, :cached], attention_mask[:, :cached], cache=cache.window(0, cached), logits_to_keep=1)
        calls, processed = calls + 1, processed + x[:, :cached].numel()
    for k in range(int((last_block - first_block).max()) + 1):
        current = first_block + k
        in_block = (block_id == current[:, None]) & (current <= last_block)[:, None]  # [B, T]
        window_end = int(torch.where(in_block, column[None, :] + 1, 0).max())
        schedule = tokens_per_step(torch.full((batch,), block, device=device), options.steps_per_block)
        for step in range(options.steps_per_block):
            masked = (x == mask_id) & in_block
            if not bool(masked.any()):
                break
            # Feed every column after the cache: the current blocks, and finished blocks not cached yet. The lm
            # head runs on the columns still masked (recording predictions wants every fed column).
            columns = masked.any(dim=0).nonzero().squeeze(1)
            logits = policy.logits(x[:, cached:window_end], attention_mask[:, :window_end],
                                   cache=cache.window(cached, window_end),
                                   logits_to_keep=0 if record_predictions else columns - cached)
            calls, processed = calls + 1, processed + x[:, cached:window_end].numel()
            # blocks before every row's current one are exact: the next forward keeps their keys and writes after
            first_fed, cached = cached, block_start(current)
            step_logits = (logits[:, columns - first_fed] if record_predictions else logits).double()
            step_logits = suppress_stop_tokens(step_logits, columns[None, :] - completion_start[:, None],
                                               options.min_new_tokens, stop_ids)
            # SDAR's order: temperature, then top-k, then top-p on the tempered distribution. A committed mask
            # token would leave a finished block masked under a cache that never revisits it: it is never drawn.
            tempered = step_logits / options.temperature if options.temperature > 0 else step_logits
            sampling_logits = filter_logits(tempered.index_fill(-1, torch.tensor([mask_id], device=device),
                                                                float("-inf")), options.top_k, options.top_p)
            predicted = gumbel_max_sample(sampling_logits, 1.0 if options.temperature > 0 else 0.0, generator)
            sampling_logp = torch.log_softmax(sampling_logits, dim=-1)
            probability = sampling_logp.gather(-1, predicted[..., None]).squeeze(-1).exp()
            logp = (step_logits.gather(-1, predicted[..., None]).squeeze(-1) - torch.logsumexp(step_logits, -1)).float()
            candidates = masked[:, columns]
            confidence = probability.masked_fill(~candidates, float("-inf"))
            entropy = None
            if options.remasking_strategy == "entropy_bounded":
                entropy = -(sampling_logp.exp() * sampling_logp.nan_to_num(neginf=0.0)).sum(dim=-1)
            chosen = commit_by_rule(options.remasking_strategy, confidence, schedule[:, step], options.threshold,
                                    entropy, options.eb_threshold) & candidates
            if record_predictions:
                # candidates' probabilities are already tempered; guesses follow the option
                scale = options.temperature if options.tempered_confidence and options.temperature > 0 else 1.0
                fresh = torch.softmax(logits.double() / scale, dim=-1).max(dim=-1)
                guess[:, first_fed:window_end] = fresh.indices
                guess_confidence[:, first_fed:window_end] = fresh.values.float()
                step_guess = torch.where(x == mask_id, guess, x)
                step_guess[:, columns] = torch.where(candidates, predicted, step_guess[:, columns])
                step_confidence = torch.where(x == mask_id, guess_confidence, torch.ones_like(guess_confidence))
                step_confidence[:, columns] = torch.where(candidates, probability.float(), step_confidence[:, columns])
                predictions.append(completion(step_guess))
                confidences.append(completion(step_confidence))
            x[:, columns] = torch.where(chosen, predicted, x[:, columns])
            unmask_step[:, columns] = torch.where(chosen, calls - 1, unmask_step[:, columns])
            commit_logp[:, columns] = torch.where(chosen, logp, commit_logp[:, columns])
            if options.early_exit and bool(first_stop_done(completion(x), mask_id, stop_ids).all()):
                still = (x == mask_id) & in_completion
                x.masked_fill_(still, int(stop_ids[0]))
                unmask_step.masked_fill_(still, calls - 1)
                return finish()
    return finish()


@register_sampler("block_diffusion")
class BlockDiffusionSampler(Sampler):
    """Block-by-block decoding on the model's own block grid with an exact KV cache of finished blocks."""

    options_class = BlockDiffusionOptions
    takes_min_new_tokens = True
    accepts_prefill = True

    def data_dependent_steps(self, options) -> str | None:
        if options.remasking_strategy in ("low_confidence_dynamic", "entropy_bounded") or options.early_exit:
            return "decides how many tokens a step commits, or when to stop, from the data: set options " \
                   "{remasking_strategy: low_confidence_static, early_exit: false}"
        return None

    def left_to_right(self, policy, gen_length: int) -> dict:
        # one token per step of each block (SDAR's schedule: block size / steps), the leftmost masked first
        return {"steps_per_block": policy.block_size, "remasking_strategy": "sequential"}

    def __call__(self, policy, prompt_ids, prompt_mask, options: BlockDiffusionOptions, *, generator=None,
                 record_predictions=False, prefill=None) -> SamplerOutput:
        if policy.block_size is None:
            raise ValueError(f"block_diffusion decodes block-causal models; this {policy.family.name} model has full "
                             "attention: use sampler='llada' or 'fast_dllm'")
        return decode_blocks_exactly(policy, prompt_ids, prompt_mask, options, generator=generator,
                                     record_predictions=record_predictions, prefill=prefill)


__all__ = ["BlockDiffusionOptions", "BlockDiffusionSampler", "BLOCK_REMASKING", "decode_blocks_exactly",
           "filter_logits", "commit_by_rule", "entropy_bounded"]
