"""Diffusion supervised fine-tuning on (prompt, answer) pairs: LLaDA's objective for full-attention policies,
SDAR's block-diffusion objective for block-causal ones.

Answers are padded with EOS to a fixed length, and the EOS padding is an ordinary target: that is how a
masked diffusion LM learns to stop. Each row draws t ~ U(0, 1] and masks each answer token with probability
p = (1 − ε)t + ε, never the prompt. What the policy's attention is decides the rest (``policy.block_size``):

* full attention (LLaDA, Dream, ``tiny``; ALGORITHMS.md §A): one forward over [prompt ; noised answer], loss
  Σ_masked CE / (p · L_ans) per row, averaged over rows;
* block-causal (SDAR, ``tiny-block``; §B): one forward over the doubled input [x_t ; x_0]
  (:meth:`~dare_gym.models.families.ModelFamily.noisy_clean_forward`), so each noisy block is predicted from
  the clean blocks before it, as block-by-block decoding sees it; a row with nothing masked is redrawn; loss
  Σ_masked CE / p over the batch divided by the batch's answer tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dare_gym.core.buffer import SequenceBatch
from dare_gym.core.device import uniform
from dare_gym.core.logprobs import token_log_probs

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


def sample_answer_masks(rows: int, length: int, generator: torch.Generator | None = None, *,
                        valid: torch.Tensor | None = None, at_least_one: bool = False):
    """LLaDA's SFT noise: per row t ~ U(0, 1] and p = (1 − ε)t + ε; each answer token masked with probability p.

    ``valid`` [rows, length] (default: all) marks the answer tokens that may be masked; ``at_least_one``
    redraws t and the masks of every row that masked none of its valid tokens, until each has one (SDAR's
    block-diffusion training does this). Returns (p [rows], masked [rows, length]) on the CPU."""
    valid = torch.ones(rows, length, dtype=torch.bool) if valid is None else valid.bool().cpu()
    p_mask, masked = _draw_masks(rows, length, generator)
    masked &= valid
    redraw = ~masked.any(dim=1) & valid.any(dim=1) if at_least_one else torch.zeros(rows, dtype=torch.bool)
    while bool(redraw.any()):
        again_p, again = _draw_masks(int(redraw.sum()), length, generator)
        p_mask[redraw], masked[redraw] = again_p, again & valid[redraw]
        redraw = ~masked.any(dim=1) & valid.any(dim=1)
    return p_mask, masked


def _draw_masks(rows: int, length: int, generator: torch.Generator | None):
    t = 1 - uniform(rows, generator, "cpu")  # U(0, 1]
    p_mask = (1 - P_MASK_EPS) * t + P_MASK_EPS
    return p_mask, uniform((rows, length), generator, "cpu") < p_mask[:, None]


def masked_answer_loss(policy, batch: SequenceBatch, answers: torch.Tensor, masked: torch.Tensor,
                       p_mask: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """The SFT ELBO loss of ``answers`` after ``batch``'s prompts, with the given tokens masked: LLaDA's (§A)
    for a full-attention policy, block diffusion's (§B, the doubled [x_t ; x_0] forward) for a block-causal one."""
    noisy = torch.cat([batch.prompt_ids, answers.masked_fill(masked, policy.mask_token_id)], dim=1)
    clean = torch.cat([batch.prompt_ids, answers], dim=1)
    logits = policy.logits(noisy, batch.attention_mask, logits_to_keep=answers.shape[1], clean_ids=clean)
    objective = masked_diffusion_sft_loss if policy.block_size is None else block_diffusion_sft_loss
    return objective(logits, answers, masked, p_mask, answer_lengths)


def masked_diffusion_loss(policy, batch: SequenceBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo sample of the SFT ELBO loss for a batch of demonstrations (block-causal policies: every
    row masks at least one answer token)."""
    answers = batch.completion_ids
    p_mask, masked = sample_answer_masks(*answers.shape, generator, valid=batch.completion_mask,
                                         at_least_one=policy.block_size is not None)
    masked = masked.to(answers.device)
    return masked_answer_loss(policy, batch, answers, masked, p_mask.to(answers.device), batch.completion_mask.sum(dim=1))


def train_on_demonstrations(
    policy,
    env,
    *,
    answer_length: int,
    learning_rate: float,
    batch_size: int = 64,
    max_steps: int | None = None,
    seconds: float | None = None,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    callback=None,
    progress: bool = True,
) -> int:
    """Diffusion SFT on the gold demonstrations of an env's training split (LLaDA's objective, or block
    diffusion's for a block-causal policy: see the module's docstring).

    Records are drawn at random (``env.record(i)`` with ``env.demonstration(record)`` as the answer) until
    ``max_steps`` optimizer steps or ``seconds`` of wall time, whichever comes first. ``callback(step,
    elapsed_s, loss)`` runs after every step (for evaluation curves; its own time is not counted). Returns
    the number of steps taken.
    """
    import time

    from tqdm.auto import tqdm

    if max_steps is None and seconds is None:
        raise ValueError("give max_steps or seconds (or both)")
    if not hasattr(env, "demonstration"):
        raise TypeError(f"{type(env).__name__} has no demonstration(record): it cannot supply SFT answers")
    optimizer = optimizer or torch.optim.AdamW(policy.model.parameters(), lr=learning_rate, weight_decay=0.0)
    bound = env.num_records or 2**31 - 1
    policy.model.train()
    step, elapsed = 0, 0.0
    bar = tqdm(total=max_steps, desc="sft", unit="step", disable=None if progress else True)
    while (max_steps is None or step < max_steps) and (seconds is None or elapsed < seconds):
        started = time.perf_counter()
        records = [env.record(int(i)) for i in torch.randint(0, bound, (batch_size,), generator=generator,
                                                                device=generator.device if generator else None)]
        batch = demonstration_batch(
            policy, [env.prompt(r) for r in records], [env.demonstration(r) for r in records], answer_length
        )
        loss = masked_diffusion_loss(policy, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            policy.model.eval()
            callback(step, elapsed, loss.item())
            policy.model.train()
    bar.close()
    policy.model.eval()
    return step


def masked_diffusion_sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_lengths: torch.Tensor,
) -> torch.Tensor:
    """LLaDA's SFT objective (the masked-diffusion ELBO on the answer):
    ``(1/B) Σ_b Σ_{k masked} CE_k / (p_b · L_b^ans)``.

    Args:
        logits: [B, L, V] at the answer positions; targets: [B, L] the clean answer tokens.
        masked: [B, L] bool, the answer positions that were masked in the input.
        p_mask: [B] each row's masking probability; answer_lengths: [B] answer length with EOS padding.
    """
    ce = -token_log_probs(logits, targets)  # float32 cross-entropy in chunks (no full-vocabulary copy)
    per_row = (ce * masked.float()).sum(dim=1) / (p_mask * answer_lengths.float())
    return per_row.mean()


def block_diffusion_sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_lengths: torch.Tensor,
) -> torch.Tensor:
    """Block-diffusion SFT (SDAR, ALGORITHMS.md §B): ``Σ_b Σ_{k masked} CE_k / p_b``, divided by the number of
    answer tokens in the whole (micro-)batch ``Σ_b L_b^ans`` rather than row by row as in §A.

    Args:
        logits: [B, L, V] the noisy copy's logits at the answer positions (the doubled [x_t ; x_0] forward of
            :meth:`~dare_gym.models.families.ModelFamily.noisy_clean_forward`); targets: [B, L] the clean answer.
        masked: [B, L] bool, the answer positions masked in x_t.
        p_mask: [B] each row's masking probability; answer_lengths: [B] answer length with EOS padding.
    """
    ce = -token_log_probs(logits, targets)
    weighted = (ce * masked.float()).sum(dim=1) / p_mask
    return weighted.sum() / answer_lengths.sum().clamp(min=1).float()
