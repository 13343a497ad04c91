"""Token log-probabilities and entropies at real vocabulary sizes.

At 126k–157k tokens a full-vocabulary float32 log-softmax over a whole batch is the largest tensor of an
update (batch 8 × 320 positions × 126k × 4 bytes = 1.3 GB, twice with its gradient). These functions work in
float32 chunks of rows and keep only what the backward needs, so bf16 logits stay the one big tensor.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 26  # rows × vocabulary per float32 chunk (256 MB): bounds the memory of log-softmaxes


def _chunk_rows(vocabulary: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocabulary))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """Log-probabilities in at least float32: half precision is too coarse for ratios."""
    return torch.promote_types(logits.dtype, torch.float32)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[target], computed in float32 chunks of rows. Neither direction materialises a
    full-vocabulary float32 tensor of the whole batch (126k–157k vocabularies at real sizes): the forward
    keeps only the per-row log-normaliser, and the backward rebuilds each chunk's softmax from it."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        dtype, step = _compute_dtype(logits), _chunk_rows(logits.shape[-1])
        values = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        normalisers = torch.empty_like(values)
        for start in range(0, flat.shape[0], step):
            chunk = flat[start : start + step].to(dtype)
            normalisers[start : start + step] = torch.logsumexp(chunk, dim=-1)
            values[start : start + step] = chunk.gather(-1, flat_targets[start : start + step, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, normalisers)
        return (values - normalisers).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, normalisers = ctx.saved_tensors
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        grad_flat = grad_output.reshape(-1).to(normalisers.dtype)
        grad_logits = torch.empty_like(flat)
        step = _chunk_rows(logits.shape[-1])
        for start in range(0, flat.shape[0], step):
            end = start + step
            grad = grad_flat[start:end, None]
            # d/dlogits of (logit[target] − logsumexp) = onehot(target) − softmax
            chunk = -(flat[start:end].to(normalisers.dtype) - normalisers[start:end, None]).exp() * grad
            chunk.scatter_add_(-1, flat_targets[start:end, None], grad)
            grad_logits[start:end] = chunk.to(flat.dtype)
        return grad_logits.view(logits.shape), None


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] [..] in at least float32, without materialising the full log-softmax."""
    return _TokenLogProbs.apply(logits, targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The predictive entropy at every position [..] (detached, for logs), in float32 chunks of rows."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    dtype, step = _compute_dtype(logits), _chunk_rows(logits.shape[-1])
    entropy = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
    for start in range(0, flat.shape[0], step):
        log_probs = torch.log_softmax(flat[start : start + step].to(dtype), dim=-1)
        entropy[start : start + step] = -(log_probs.exp() * log_probs).sum(dim=-1)
    return entropy.view(logits.shape[:-1])


__all__ = ["token_log_probs", "token_entropy"]
