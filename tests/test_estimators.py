"""Likelihood estimators: what they mask, what they score, and their values against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.core.buffer import SequenceBatch
from dare_gym.core.estimators import OneStepMaskedPrompt, RandomRatio, make_estimator, token_log_probs

MASK, PAD, VOCAB = 3, 0, 12


def batch() -> SequenceBatch:
    """Two rows: prompts of 4 and 2 real tokens (left-padded to 4), completions of 5 tokens."""
    prompt = torch.tensor([[5, 6, 7, 8], [PAD, PAD, 9, 10]])
    completion = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 4, 2]])
    attention = torch.cat([torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), torch.ones(2, 5, dtype=torch.long)], dim=1)
    return SequenceBatch(torch.cat([prompt, completion], dim=1), attention, 4, torch.ones(2, 5, dtype=torch.long))


class RecordingModel:
    """logits(ids) puts n on token ids[b, i] + 1 (mod V) at every position, n = masks in row b: a value
    that depends on the noise and is easy to compute by hand."""

    def __init__(self):
        self.inputs = []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                 clean_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(input_ids.clone())
        counts = (input_ids == MASK).sum(dim=1).double()
        logits = torch.zeros(*input_ids.shape, VOCAB, dtype=torch.float64)
        logits.scatter_(-1, ((input_ids + 1) % VOCAB)[..., None], counts[:, None, None].expand(-1, input_ids.shape[1], 1))
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def expected_logp(n_masks: int, hit: bool) -> float:
    """log-softmax of a vector with one entry n and VOCAB-1 zeros, at the n entry (hit) or a zero."""
    normaliser = math.log(math.exp(n_masks) + VOCAB - 1)
    return (n_masks if hit else 0.0) - normaliser


def test_token_log_probs_equals_log_softmax():
    logits = torch.randn(3, 4, 50)
    targets = torch.randint(0, 50, (3, 4))
    want = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_log_probs(logits, targets), want, atol=1e-6)


def test_d1_masks_the_whole_completion_and_only_real_prompt_tokens():
    estimator = OneStepMaskedPrompt(mask_token_id=MASK, p_mask_prompt=0.5)
    b = batch()
    noise = estimator.sample_noise(b, torch.Generator().manual_seed(0))
    assert not noise["prompt_masked"][1, :2].any()  # padding is never masked
    model = RecordingModel()
    scores = estimator.token_logp(model, b, noise)
    seen = model.inputs[0]
    assert (seen[:, 4:] == MASK).all()
    assert torch.equal(seen[:, :4] == MASK, noise["prompt_masked"])
    assert scores.scored.all()
    # Every completion input is MASK, so each logit row puts n on MASK + 1 = 4; token 4 is a hit.
    for row in range(2):
        n = int((seen[row] == MASK).sum())
        for k, token in enumerate(b.completion_ids[row].tolist()):
            assert scores.logp[row, k].item() == pytest.approx(expected_logp(n, token == MASK + 1))


def test_d1_prompt_mask_rate_and_fresh_draws():
    estimator = OneStepMaskedPrompt(mask_token_id=MASK, p_mask_prompt=0.15)
    b = batch()
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([estimator.sample_noise(b, generator)["prompt_masked"] for _ in range(4000)])
    real = b.prompt_attention.bool()
    rate = draws[:, real].float().mean().item()
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / draws[:, real].numel())
    assert not draws[:, ~real].any()
    assert len({tuple(d[real].tolist()) for d in draws[:500]}) > 20  # a fresh mask on every call


def test_random_ratio_scores_exactly_the_masked_completion_tokens():
    estimator = RandomRatio(mask_token_id=MASK, t_min=0.1)
    b = batch()
    noise = estimator.sample_noise(b, torch.Generator().manual_seed(2))
    model = RecordingModel()
    scores = estimator.token_logp(model, b, noise)
    seen = model.inputs[0]
    assert torch.equal(seen[:, :4], b.prompt_ids)  # the prompt stays visible
    assert torch.equal(seen[:, 4:] == MASK, noise["completion_masked"])
    assert torch.equal(scores.scored, noise["completion_masked"])
    for row in range(2):
        n = int((seen[row] == MASK).sum())
        for k in range(5):
            hit = int(seen[row, 4 + k]) + 1 == int(b.completion_ids[row, k])
            assert scores.logp[row, k].item() == pytest.approx(expected_logp(n, hit))


def test_random_ratio_noise_levels_follow_t():
    estimator = RandomRatio(mask_token_id=MASK, t_min=0.4)
    rows = 4000
    b = SequenceBatch(torch.zeros(rows, 8, dtype=torch.long), torch.ones(rows, 8, dtype=torch.long), 2,
                      torch.ones(rows, 6, dtype=torch.long))
    noise = estimator.sample_noise(b, torch.Generator().manual_seed(3))
    t = noise["t"]
    assert t.min() > 0.4 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.7, abs=0.01)
    low, high = t < 0.55, t > 0.85
    assert noise["completion_masked"][low].float().mean() < noise["completion_masked"][high].float().mean() - 0.2


def test_estimators_are_chosen_by_name():
    assert isinstance(make_estimator("d1", mask_token_id=MASK, p_mask_prompt=0.3), OneStepMaskedPrompt)
    assert make_estimator("random_ratio", mask_token_id=MASK, t_min=0.2).t_min == 0.2
    with pytest.raises(ValueError, match="unknown likelihood estimator 'mystery'"):
        make_estimator("mystery", mask_token_id=MASK)
    with pytest.raises(ValueError, match="t_min"):
        RandomRatio(mask_token_id=MASK, t_min=1.5)
