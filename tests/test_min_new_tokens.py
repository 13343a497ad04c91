"""`min_new_tokens`: no stop token at the first N completion positions, in every sampler that takes it."""

from __future__ import annotations

import pytest
import torch

import dare_gym
from dare_gym.samplers.base import suppress_stop_tokens


def first_stop(ids: torch.Tensor, stops: list[int]) -> int:
    hits = torch.isin(ids, torch.tensor(stops)).nonzero()
    return int(hits[0]) if len(hits) else len(ids)


@pytest.mark.parametrize("policy_name,prompt,settings,minimum", [
    ("tiny", "sort 583920\n", dict(gen_length=16, steps=16, block_length=16), 10),
    ("tiny", "sort 583920\n", dict(gen_length=16, steps=16, block_length=16, sampler="fast_dllm"), 10),
    ("tiny-block", None, dict(gen_length=72), 70),
])
def test_no_stop_token_before_min_new_tokens(policy_name, prompt, settings, minimum):
    policy = dare_gym.load_policy(policy_name)
    if prompt is None:  # tiny-block's own task: a group-sort prompt, whose 67-character answer then stops
        prompt, _ = dare_gym.make("groupsort-v0", split="test").reset(options={"index": 0})
    [free] = policy.generate([prompt], **settings)
    [held] = policy.generate([prompt], min_new_tokens=minimum, **settings)
    stops = policy.stop_token_ids
    assert first_stop(free.completion_ids, stops) < minimum  # the policy stops early on its own
    assert first_stop(held.completion_ids, stops) >= minimum
    assert int(policy.completion_mask(held.completion_ids[None]).sum()) >= minimum  # the loss scores them


def test_suppress_stop_tokens_masks_exactly_the_early_completion_positions():
    logits = torch.zeros(2, 4, 5)
    positions = torch.tensor([[-1, 0, 1, 2], [1, 2, 3, 4]])  # row 0 starts with a prompt column
    out = suppress_stop_tokens(logits, positions, 3, torch.tensor([2, 4]))
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    for row, column in ((0, 1), (0, 2), (0, 3), (1, 0), (1, 1)):
        expected[row, column, [2, 4]] = True
    assert torch.equal(torch.isinf(out), expected) and out[expected].max() == float("-inf")
    assert suppress_stop_tokens(logits, positions, 0, torch.tensor([2])) is logits


def test_a_sampler_that_does_not_take_it_says_so():
    with pytest.raises(ValueError, match="sampler 'diffusion_gemma' does not take min_new_tokens"):
        dare_gym.load_policy("tiny-gemma").generate(["sort 12\n"], min_new_tokens=2)
