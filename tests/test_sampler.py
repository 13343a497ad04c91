"""The masked-diffusion sampler against a reference written from the LLaDA paper's description."""

from __future__ import annotations

import pytest
import torch

from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.samplers.base import tokens_per_step
from dare_gym.samplers.llada import check_schedule


def random_policy(seed: int = 0, dtype=torch.float64) -> DiffusionPolicy:
    """A randomly initialised tiny dLLM; float64 so that batching cannot flip a near-tie."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, initializer_range=0.5, mask_token_id=tokenizer.mask_token_id)
    model = TinyDLLMForMaskedLM(config).to(dtype).eval()
    return DiffusionPolicy(model, tokenizer, family="tiny")


@torch.no_grad()
def reference_generate(model, prompt: torch.Tensor, *, steps, gen_length, block_length, mask_id) -> torch.Tensor:
    """LLaDA's semi-autoregressive low-confidence remasking, one unpadded sequence at a time, written from the
    paper: blocks left to right; inside a block, each step predicts every masked token greedily and commits
    the most confident ones, n_s per step with the block's m tokens spread as floor(m/S) and the remainder
    on the first steps; positions right of the block can never be committed."""
    length = prompt.numel()
    x = torch.full((1, length + gen_length), mask_id, dtype=torch.long)
    x[0, :length] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        block_start, block_end = length + block * block_length, length + (block + 1) * block_length
        masked_in_block = int((x[0, block_start:block_end] == mask_id).sum())
        counts = [masked_in_block // steps_per_block + (1 if s < masked_in_block % steps_per_block else 0)
                  for s in range(steps_per_block)]
        for step in range(steps_per_block):
            is_masked = x[0] == mask_id
            logits = model(x).logits[0]
            prediction = logits.argmax(dim=-1)
            probability = torch.softmax(logits.double(), dim=-1).gather(-1, prediction[:, None]).squeeze(-1)
            probability[block_end:] = float("-inf")
            confidence = torch.where(is_masked, probability, torch.tensor(float("-inf"), dtype=torch.float64))
            chosen = torch.topk(confidence, k=counts[step]).indices
            x[0, chosen] = prediction[chosen]
    return x[0, length:]


PROMPTS = ["sort 583920\n", "hi", "a much longer prompt, with spaces!\n", "q: 2+2=?\n", "x"]


@pytest.mark.parametrize(
    "gen_length,steps,block_length", [(16, 16, 16), (16, 8, 4), (12, 6, 4), (10, 7, 10), (8, 3, 8)]
)
def test_greedy_low_confidence_matches_reference_one_by_one_and_batched(gen_length, steps, block_length):
    policy = random_policy()
    settings = dict(gen_length=gen_length, steps=steps, block_length=block_length, temperature=0.0,
                    remasking="low_confidence")
    expected = [
        reference_generate(policy.model, policy.encode_prompts([p])[0][0], steps=steps, gen_length=gen_length,
                           block_length=block_length, mask_id=policy.mask_token_id)
        for p in PROMPTS
    ]
    one_by_one = [policy.generate([p], **settings)[0].completion_ids for p in PROMPTS]
    batched = [c.completion_ids for c in policy.generate(PROMPTS, **settings)]
    for want, single, batch in zip(expected, one_by_one, batched):
        assert torch.equal(single, want)
        assert torch.equal(batch, want)  # padding must not leak into attention or positions


def test_batched_equals_single_in_float32_on_the_trained_model(tiny_policy):
    prompts = [f"sort {d}\n" for d in ("583920", "111111", "907")] + ["sort 12\n"]
    batched = tiny_policy.generate(prompts, temperature=0.0)
    for prompt, together in zip(prompts, batched):
        alone = tiny_policy.generate([prompt], temperature=0.0)[0]
        assert torch.equal(alone.completion_ids, together.completion_ids)
        assert alone.text == together.text


def test_unmask_step_records_the_schedule():
    policy = random_policy(1)
    out = policy.generate(PROMPTS[:3], gen_length=12, steps=6, block_length=4, temperature=0.0)
    for completion in out:
        steps = completion.unmask_step
        assert steps.min() >= 0 and steps.max() == 5
        # 3 blocks of 4 tokens, 2 steps per block, 2 tokens per step; block b uses steps 2b and 2b+1.
        assert torch.equal(torch.bincount(steps, minlength=6), torch.full((6,), 2))
        for block in range(3):
            assert set(steps[4 * block : 4 * block + 4].tolist()) == {2 * block, 2 * block + 1}


def test_temperature_gives_distinct_completions_within_a_group(tiny_policy):
    group = ["sort 583920\n"] * 8
    greedy = tiny_policy.generate(group, temperature=0.0)
    assert len({c.text for c in greedy}) == 1
    sampled = tiny_policy.generate(group, temperature=1.0, seed=0)
    assert len({tuple(c.completion_ids.tolist()) for c in sampled}) >= 3
    again = tiny_policy.generate(group, temperature=1.0, seed=0)
    assert [c.text for c in again] == [c.text for c in sampled]  # seeded sampling is reproducible


def test_random_remasking_commits_in_a_different_order():
    policy = random_policy(2)
    confident = policy.generate(["hello"], gen_length=16, steps=16, block_length=16, remasking="low_confidence")[0]
    shuffled = policy.generate(["hello"], gen_length=16, steps=16, block_length=16, remasking="random", seed=3)[0]
    assert sorted(shuffled.unmask_step.tolist()) == list(range(16))
    assert not torch.equal(confident.unmask_step, shuffled.unmask_step)


def test_tokens_per_step_spreads_the_remainder_over_the_first_steps():
    assert tokens_per_step(torch.tensor([4]), 3).tolist() == [[2, 1, 1]]
    assert tokens_per_step(torch.tensor([32]), 16).tolist() == [[2] * 16]
    assert tokens_per_step(torch.tensor([5, 3]), 2).tolist() == [[3, 2], [2, 1]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=10, steps=4, block_length=4), "multiple of block_length"),
        (dict(gen_length=16, steps=3, block_length=4), "multiple of the number of blocks"),
        (dict(gen_length=0, steps=3, block_length=4), "gen_length must be a positive integer"),
    ],
)
def test_bad_schedules_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_schedule(**kwargs)


def test_bad_sampler_arguments_are_rejected():
    policy = random_policy()
    with pytest.raises(ValueError, match="remasking must be one of"):
        policy.generate(["x"], gen_length=4, steps=4, block_length=4, remasking="entropy")
    with pytest.raises(TypeError, match="list of strings"):
        policy.generate("x", gen_length=4, steps=4, block_length=4)
