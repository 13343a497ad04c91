"""The env hint API (the partial gold reasoning IGPO inpaints) on the real data files, and the sampler's prefill
(completion tokens it keeps and never remasks)."""

from __future__ import annotations

import pytest
import torch

import dare_gym
from dare_gym.envs.base import leading_fraction


def test_leading_fraction_cuts_at_word_or_character_boundaries():
    text = "one two  three four"
    assert leading_fraction(text, 0.5) == "one two"
    assert leading_fraction(text, 0.51) == "one two  three"  # rounded up: 3 of 4 words, spacing kept
    assert leading_fraction(text, 1.0) == text
    assert leading_fraction(text, 0.0) == ""
    assert leading_fraction("0123456789", 0.25, unit="chars") == "012"
    with pytest.raises(ValueError, match="hint fraction must be a number in \\[0, 1\\], got 1.5"):
        leading_fraction(text, 1.5)
    with pytest.raises(ValueError, match="unit must be 'words' or 'chars', got 'lines'"):
        leading_fraction(text, 0.5, unit="lines")


def test_gsm8k_hint_is_the_rationale_without_annotations_or_final_answer():
    env = dare_gym.make("gsm8k-v0")
    record = env.record(0)  # Natalia's clips: "Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72"
    full = env.hint(record, 1.0)
    assert full == ("Natalia sold 48/2 = 24 clips in May.\n"
                    "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert "####" not in full and "<<" not in full
    assert env.hint(record, 0.25) == "Natalia sold 48/2 = 24"  # 5 of the 19 words (ceil(0.25 · 19))
    assert full.startswith(env.hint(record, 0.6))
    with pytest.raises(ValueError, match="got -0.1"):
        env.hint(record, -0.1)


def test_math_hint_is_the_leading_part_of_the_solution():
    env = dare_gym.make("math-v0", split="test")
    record = env.record(0)
    assert env.hint(record, 1.0) == record["solution"]
    half = env.hint(record, 0.5)
    words = record["solution"].split()
    assert half.split() == words[:(len(words) + 1) // 2]
    assert "\\boxed" not in half  # the answer sits at the end of the solution
    math500 = dare_gym.make("math500-v0")
    assert math500.hint(math500.record(3), 1.0) == math500.record(3)["solution"]


def test_sorting_hints_are_the_leading_characters_of_the_gold_answer():
    digits = dare_gym.make("digitsort-v0")
    record = digits.record(7)
    assert digits.hint(record, 1.0) == record["gold"] == "".join(sorted(record["digits"]))
    assert digits.hint(record, 0.5) == record["gold"][:3]
    groups = dare_gym.make("groupsort-v0")
    record = groups.record(2)
    assert groups.hint(record, 1 / 3) == record["gold"][:len(record["gold"]) // 3 + 1]


def test_tasks_without_reasoning_have_no_hint_and_the_vector_env_collects_them():
    countdown = dare_gym.make("countdown-v0")
    assert countdown.hint(countdown.record(0), 0.5) is None
    vector = dare_gym.make_vec("digitsort-v0", 2, group_size=2)
    first, second = vector.envs[0].record(3), vector.envs[0].record(4)
    assert vector.hints([3, 4], 0.5) == [first["gold"][:3], second["gold"][:3]]


# ------------------------------------------------------------------------------------------ sampler prefill


def _prefill_rows(policy, gold: str, keep: list[int], gen_length: int) -> torch.Tensor:
    """A [gen_length] prefill holding the gold completion's tokens (the answer, then EOS) at positions ``keep``,
    the mask id elsewhere."""
    ids = policy.tokenizer(gold, add_special_tokens=False)["input_ids"]
    ids = ids + [policy.tokenizer.eos_token_id] * (gen_length - len(ids))
    row = torch.full((gen_length,), policy.mask_token_id, dtype=torch.long)
    for position in keep:
        row[position] = ids[position]
    return row


@pytest.mark.parametrize("sampler, options", [
    ("llada", dict(gen_length=8, steps=4, block_length=8)),
    ("fast_dllm", dict(gen_length=8, steps=4, block_length=8, cache="dual", threshold=None, early_exit=False)),
])
def test_prefilled_tokens_stay_and_only_the_free_positions_are_scheduled(tiny_policy, sampler, options):
    env = dare_gym.make("digitsort-v0")
    records = [env.record(i) for i in (5, 6)]
    prompts = [env.prompt(r) for r in records]
    keep = [0, 2, 5, 6]  # four fixed tokens; the four free ones are spread over 4 steps: one per step
    prefill = [_prefill_rows(tiny_policy, r["gold"], keep, 8) for r in records[:1]] + [None]
    out = tiny_policy.generate(prompts, sampler=sampler, temperature=0.7, seed=3, prefill=prefill, **options)
    fixed, free = torch.tensor(keep), torch.tensor([1, 3, 4, 7])
    assert torch.equal(out[0].completion_ids[fixed], prefill[0][fixed])
    assert (out[0].unmask_step[fixed] == -1).all() and (out[0].commit_logp[fixed] == 0).all()
    assert sorted(out[0].unmask_step[free].tolist()) == [0, 1, 2, 3]  # generated, one per step
    assert (out[0].completion_ids != tiny_policy.mask_token_id).all()
    assert sorted(out[1].unmask_step.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # a row without prefill: 8 over 4 steps
    # a fully prefilled completion needs no forward at all
    whole = _prefill_rows(tiny_policy, records[0]["gold"], list(range(8)), 8)
    done, stats = tiny_policy.generate(prompts[:1], sampler=sampler, prefill=[whole], return_stats=True, **options)
    assert torch.equal(done[0].completion_ids, whole) and stats["model_calls"] == 0


def test_block_diffusion_keeps_prefilled_tokens_and_decodes_the_rest():
    policy = dare_gym.load_policy("tiny-block")
    env = dare_gym.make("groupsort-v0")
    record = env.record(1)
    gen_length = 16
    keep = [0, 1, 2, 5, 9]
    prefill = _prefill_rows(policy, record["gold"], keep, gen_length)
    options = dict(gen_length=gen_length, steps_per_block=4, remasking_strategy="low_confidence_static",
                   early_exit=False, temperature=0.0)
    out = policy.generate([env.prompt(record)] * 2, sampler="block_diffusion", prefill=[prefill, None], **options)
    fixed = torch.tensor(keep)
    assert torch.equal(out[0].completion_ids[fixed], prefill[fixed])
    assert (out[0].unmask_step[fixed] == -1).all()
    free = torch.ones(gen_length, dtype=torch.bool)
    free[fixed] = False
    assert (out[0].unmask_step[free] >= 0).all()
    assert (out[0].completion_ids != policy.mask_token_id).all()
    assert (out[1].unmask_step >= 0).all()  # the row without prefill decodes everything


def test_prefill_errors_name_the_bad_value(tiny_policy):
    with pytest.raises(ValueError, match="prefill has 1 entries for 2 prompts"):
        tiny_policy.generate(["sort 21\n", "sort 12\n"], gen_length=8, steps=8, block_length=8, prefill=[None])
    with pytest.raises(ValueError, match=r"prefill entry 0 has shape \(3,\), expected \(8,\)"):
        tiny_policy.generate(["sort 21\n"], gen_length=8, steps=8, block_length=8, prefill=[[1, 2, 3]])
    with pytest.raises(ValueError, match="sampler 'diffusion_gemma' cannot keep prefilled completion tokens"):
        tiny_policy.generate(["sort 21\n"], sampler="diffusion_gemma", prefill=[None])
